"""Splitting model output into the API's fields: reasoning (`<think>…</think>`), content and tool calls.

Every parse is a pure function of the text generated so far. A stream sends the difference between successive
parses, and the parse holds back a trailing piece that could still grow into a marker, so each field only ever
grows: the streamed deltas concatenate to exactly the non-streamed result, however the text was split.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dsv3.tokenizer import THINK, THINK_END, TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN, TOOL_SEP

ARGS_OPEN, ARGS_END = "```json\n", "\n```"  # around a call's arguments, after the line with its name


def _held(text: str, marker: str, final: bool) -> str:
    """`text` without its longest tail that is a proper prefix of `marker` (it may still become the marker),
    unless the output is final."""
    if not final:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                return text[:-k]
    return text


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
    return _held(body, THINK_END, final), ""


@dataclass
class Call:
    name: str
    arguments: str  # the JSON text so far


def split_tool_calls(text: str, final: bool) -> tuple[str, list[Call]]:
    """(content, calls) of DeepSeek's tool-call layout (docs/api.md#chat-template): content, then <｜tool▁calls▁begin｜> and per
    call <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>. A call appears once
    its name is complete; its arguments grow as they arrive."""
    if TOOL_CALLS_BEGIN not in text:
        return _held(text, TOOL_CALLS_BEGIN, final), []
    content, block = text.split(TOOL_CALLS_BEGIN, 1)
    calls = []
    for part in block.split(TOOL_CALL_BEGIN)[1:]:
        head, sep, rest = part.partition(TOOL_SEP)
        name, newline, rest = rest.partition("\n")
        if not (sep and newline):
            break  # the name is not complete yet
        if not rest.startswith(ARGS_OPEN):  # "```json" itself still arriving (or malformed): no arguments yet
            calls.append(Call(name.strip(), ""))
            continue
        body = rest[len(ARGS_OPEN):]
        args = body.split(ARGS_END, 1)[0] if ARGS_END in body else _held(body, ARGS_END, final)
        calls.append(Call(name.strip(), args))
    return content, calls


@dataclass
class OutputParser:
    """One choice's output as API fields. `parse` is the pure split; `delta` is what a stream sends next (each
    field only grows, a tool call's id, type and name come with its first fragment)."""
    reasoning: bool  # the model thinks in <think>…</think>
    thinking: bool = False  # the prompt already opened <think>
    tools: bool = False  # tool calls are parsed out of the content
    sent: list[str] = field(default_factory=lambda: ["", ""])  # reasoning, content streamed so far
    args: list[str] = field(default_factory=list)  # per streamed call: its arguments so far
    ids: list[str] = field(default_factory=list)

    def parse(self, text: str, final: bool) -> tuple[str, str, list[Call]]:
        reasoning, content = split_reasoning(text, self.thinking, final) if self.reasoning else ("", text)
        return (reasoning, *split_tool_calls(content, final)) if self.tools else (reasoning, content, [])

    def call_id(self, i: int) -> str:
        while len(self.ids) <= i:
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self.ids[i]

    def delta(self, text: str, final: bool) -> dict:
        reasoning, content, calls = self.parse(text, final)
        delta = {}
        for key, new, i in (("reasoning_content", reasoning, 0), ("content", content, 1)):
            if not new.startswith(self.sent[i]):
                raise AssertionError(f"the parse shrank {key}, which was already streamed")
            if len(new) > len(self.sent[i]):
                delta[key], self.sent[i] = new[len(self.sent[i]):], new
        out = []
        for i, call in enumerate(calls):
            if i == len(self.args):
                out.append({"index": i, "id": self.call_id(i), "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}})
                self.args.append(call.arguments)
            elif call.arguments != self.args[i]:
                if not call.arguments.startswith(self.args[i]):
                    raise AssertionError("the parse shrank a tool call's arguments, which were already streamed")
                out.append({"index": i, "function": {"arguments": call.arguments[len(self.args[i]):]}})
                self.args[i] = call.arguments
        if out:
            delta["tool_calls"] = out
        return delta
