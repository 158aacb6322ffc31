"""Constrained decoding: outputs that are valid JSON (or match a JSON schema, or are well-formed DeepSeek tool
calls) by construction — a token mask from a grammar at every step, never a retry loop.

The grammars and their masks come from xgrammar (a maintained library made for this, used by vLLM, SGLang and
TensorRT-LLM): it compiles JSON schemas and DeepSeek's tool-call format (its builtin "deepseek_r1" structural tag
is exactly the V3 / R1 layout of docs/api.md#chat-template) against our tokenizer's byte-level vocabulary, and
masks a step cheaply enough to run at every token. We chose it over outlines (slower index compilation, a larger
dependency tree) and lm-format-enforcer (character-level, slower per token).

`Structured(tokenizer, vocab_size)` compiles grammars; a `Grammar` goes into `SamplingParams.grammar`, and the
engine gives every sequence of the request its own matcher, masks that sequence's logits row before sampling and
advances the matcher with each token it appends.
"""
from __future__ import annotations

import json

import torch

from dsv3.tokenizer import THINK, THINK_END, Tokenizer

MAX_WHITESPACE = 2  # JSON whitespace runs are at most this long: no endless-whitespace outputs


class Grammar:
    def __init__(self, compiled):
        self.compiled = compiled

    def matcher(self) -> Matcher:
        import xgrammar as xgr
        return Matcher(xgr.GrammarMatcher(self.compiled))


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m):
        self.m = m

    def mask(self, logits_V: torch.Tensor) -> None:
        """Forbid (-inf) every token the grammar does not allow next, in place."""
        import xgrammar as xgr
        bitmask = xgr.allocate_token_bitmask(1, logits_V.shape[-1])
        self.m.fill_next_token_bitmask(bitmask, 0)
        xgr.apply_token_bitmask_inplace(logits_V[None], bitmask.to(logits_V.device, non_blocking=True))

    def accept(self, token: int) -> None:
        if not self.m.accept_token(token):
            raise RuntimeError(f"token {token} is outside the grammar (its mask was not applied)")


class Structured:
    """Grammar compiler for one tokenizer and model vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError as e:
            raise ImportError('constrained decoding needs xgrammar: pip install -e ".[serve]"') from e
        info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok),
                                                  vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgr.GrammarCompiler(info)
        self._json_object: dict[bool, Grammar] = {}

    def json_object(self, reasoning: bool = False) -> Grammar:
        """Any JSON object (`response_format: json_object`); compiled once per `reasoning`."""
        if reasoning not in self._json_object:
            self._json_object[reasoning] = self.json_schema({"type": "object"}, strict=False, reasoning=reasoning)
        return self._json_object[reasoning]

    def json_schema(self, schema: dict, strict: bool = True, reasoning: bool = False) -> Grammar:
        """JSON matching `schema`; strict: no properties beyond those the schema names (where it says nothing of
        additionalProperties). reasoning: the prompt opened <think>, so the output first reasons, freely, up to
        </think>, and the JSON follows."""
        import xgrammar as xgr
        g = xgr.Grammar.from_json_schema(json.dumps(schema), strict_mode=strict, any_whitespace=True,
                                         max_whitespace_cnt=MAX_WHITESPACE)
        return Grammar(self.compiler.compile_grammar(xgr.Grammar.concat(self._reasoning(), g) if reasoning else g))

    def tool_calls(self, tools: list[dict], tool_choice, reasoning: bool, parallel: bool = True) -> Grammar:
        """DeepSeek's tool-call block with arguments matching each function's parameters. tool_choice "auto":
        free text, and any call the model starts is well-formed; "required": at least one call; a named
        choice ({"type": "function", "function": {"name": ...}}): that call. reasoning: as in `json_schema`;
        without it a demanded call is the output's first token. parallel=False: at most one call."""
        import xgrammar as xgr
        tag = xgr.get_builtin_structural_tag("deepseek_r1", tools=tools, tool_choice=tool_choice,
                                             reasoning="enabled" if reasoning else "disabled",
                                             max_whitespace_cnt=MAX_WHITESPACE, parallel_tool_calls=parallel)
        return Grammar(self.compiler.compile_structural_tag(tag))

    def _reasoning(self):
        """Free text up to and including </think> (never another <think>): what a prompt that opened <think> lets
        the model write before a constrained answer. The same part xgrammar's "deepseek_r1" tag puts first."""
        import xgrammar as xgr
        from xgrammar.structural_tag import AnyTextFormat, StructuralTag, TagFormat
        tag = StructuralTag(format=TagFormat(begin="", content=AnyTextFormat(excludes=[THINK, THINK_END]),
                                             end=THINK_END))
        return xgr.Grammar.from_structural_tag(tag)
