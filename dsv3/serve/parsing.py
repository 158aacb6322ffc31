"""Splitting model output into the API's fields: reasoning (`<think>…</think>`) and content.

Every parse is a pure function of the text generated so far. A stream sends the difference between successive
parses, and the parse holds back a trailing piece that could still grow into a marker, so each field only ever
grows: the streamed deltas concatenate to exactly the non-streamed result, however the text was split.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.tokenizer import THINK, THINK_END


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker` (0 if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def split_reasoning(text: str, thinking: bool, final: bool) -> tuple[str, str]:
    """(reasoning, content). `thinking`: the prompt ended inside an open <think> (a template's forced
    `<think>\\n`), so the output starts as reasoning even without the tag; an output that opens with <think>
    reasons too. Reasoning ends at </think>; without it, a finished output is all reasoning (cut by length)."""
    if not thinking and not text.startswith(THINK):
        if not final and THINK.startswith(text):  # might still become "<think>"
            return "", ""
        return "", text
    body = text[len(THINK):] if text.startswith(THINK) else text
    if THINK_END in body:
        reasoning, content = body.split(THINK_END, 1)
        return reasoning, content
    return (body if final else body[: len(body) - _partial_suffix(body, THINK_END)]), ""


@dataclass
class Fields:
    """What one choice has sent so far; `advance` returns the new part of each field."""
    reasoning: str = ""
    content: str = ""

    def advance(self, reasoning: str, content: str) -> tuple[str, str]:
        if not (reasoning.startswith(self.reasoning) and content.startswith(self.content)):
            raise AssertionError("a parse shrank a field that was already streamed")
        dr, dc = reasoning[len(self.reasoning):], content[len(self.content):]
        self.reasoning, self.content = reasoning, content
        return dr, dc
