"""The API's response bodies from engine outputs (docs/api.md): usage, logprobs, chat and text-completion choices,
stream chunks and their server-sent-event framing, and errors in the API's `{"error": {...}}` shape.

Plain functions of their arguments, testable without an app. `tok` is anything with the tokenizer's
`decode(ids) -> str` and `encode(text) -> ids`; a token's text is `tok.decode([id])`.
"""
from __future__ import annotations

import json
import logging
import time

from dsv3.infer.engine import CompletionOutput, RequestOutput
from dsv3.infer.sampler import TokenLogprobs
from dsv3.serve.parsing import Call, OutputParser
from dsv3.serve.protocol import APIError

log = logging.getLogger("dsv3.serve")

KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see the connection is alive
DONE = "data: [DONE]\n\n"
# Pydantic error types that mean "a value out of its allowed range" (422); the rest are shape errors (400).
_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short",
                 "value_error", "literal_error", "enum", "multiple_of", "string_too_long", "string_too_short"}


# ---- errors -------------------------------------------------------------------------------------------------
def validation_error(errors: list[dict]) -> APIError:
    """A request FastAPI could not validate (pydantic's `errors()`): 400 for a body that is not JSON or has the
    wrong shape, 422 for a value out of its range, naming the parameter (docs/api.md#errors)."""
    if any(err["type"] == "json_invalid" for err in errors):
        return APIError(400, "the request body is not valid JSON")
    err = errors[0]
    loc = [str(x) for x in err["loc"] if x != "body"]
    param = ".".join(loc) or None
    status = 422 if err["type"] in _VALUE_ERRORS and param else 400  # a whole-request rule: the shape
    if err["type"] == "extra_forbidden":  # as OpenAI words it; the field may be misspelt or not implemented
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param)
    msg = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(status, msg, param=param)


def error_event(e: Exception) -> str:
    """A failure after a stream began (its 200 is sent): an error event, as OpenAI's streams carry them."""
    log.error("stream failed: %s: %s", type(e).__name__, e, exc_info=e)
    return f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\n"


# ---- shared parts ---------------------------------------------------------------------------------------------
def head(rid: str, model: str, fingerprint: str) -> dict:
    """The fields every body and chunk of one response starts with."""
    return {"id": rid, "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}


def sse(body: dict, ascii: bool = True) -> str:
    """One server-sent event. Chat chunks are written as UTF-8 (`ascii=False`), text-completion chunks with
    non-ASCII escaped: the same JSON either way, kept as clients have always received it."""
    return f"data: {json.dumps(body, ensure_ascii=ascii)}\n\n"


def usage(runs: list[tuple[int, RequestOutput]], reasoning_tokens: int = 0) -> dict:
    """Usage of one or more engine requests, given as (prompt length, final output); DeepSeek's cache fields
    beside OpenAI's (docs/api.md#context-caching)."""
    prompt_len = sum(n for n, _ in runs)
    completion = sum(len(c.token_ids) for _, last in runs for c in last.outputs)
    hit = sum(last.num_cached_tokens for _, last in runs)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
            "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_len - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def chat_logprobs(entries: list[TokenLogprobs], tok) -> dict:
    """Chat's logprobs: per token its text, logprob, UTF-8 bytes and the top alternatives in the same form."""
    def one(t: int, lp: float) -> dict:
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprobs], offset: int, tok) -> dict:
    """Text completion's logprobs; `text_offset` counts characters of the choice's text from `offset` (the
    length of an echoed prompt before it)."""
    tokens = [tok.decode([e.token_id]) for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tok.decode([t]): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


# ---- chat completions -------------------------------------------------------------------------------------------
def finish_reason(c: CompletionOutput, calls: list) -> str:
    """"tool_calls" for a choice that stopped after calling tools, else the engine's reason."""
    return "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason


def chat_message(reasoning: str, content: str, calls: list[Call], parser: OutputParser, show_reasoning: bool) -> dict:
    """A finished choice's message; content is null rather than empty when the choice called tools."""
    message = {"role": "assistant", "content": content or (None if calls else "")}
    if show_reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"id": parser.call_id(i), "type": "function",
                                  "function": {"name": x.name, "arguments": x.arguments}}
                                 for i, x in enumerate(calls)]
    return message


def chat_completion(head: dict, last: RequestOutput, parsers: list[OutputParser], show_reasoning: bool,
                    prompt_len: int, tok) -> dict:
    """The `chat.completion` body of a finished request; one parser per choice splits reasoning, content and
    tool calls; reasoning tokens are counted by re-encoding the reasoning text."""
    choices, thought = [], 0
    for c, parser in zip(last.outputs, parsers):
        reasoning, content, calls = parser.parse(c.text, True)
        thought += len(tok.encode(reasoning)) if reasoning else 0
        message = chat_message(reasoning, content, calls, parser, show_reasoning)
        choices.append({"index": c.index, "message": message, "finish_reason": finish_reason(c, calls),
                        "logprobs": chat_logprobs(c.logprobs, tok) if c.logprobs is not None else None})
    return head | {"object": "chat.completion", "choices": choices, "usage": usage([(prompt_len, last)], thought)}


def chat_chunk(head: dict, choices: list[dict], include_usage: bool, **extra) -> str:
    """One `chat.completion.chunk` event; with `include_usage`, every chunk but the usage one has usage: null."""
    body = head | {"object": "chat.completion.chunk", "choices": choices} | extra
    if include_usage and "usage" not in extra:
        body["usage"] = None
    return sse(body, ascii=False)


def chat_role_choices(n: int) -> list[dict]:
    """The choices of a chat stream's first chunk: each choice's role and an empty content."""
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)]


def chat_deltas(out: RequestOutput, parsers: list[OutputParser], sent_logprobs: list[int],
                tok) -> tuple[list[dict], list[dict]]:
    """The choices of the (up to) two chunks one engine output makes in a chat stream: the new text and logprobs
    of each choice, then an empty delta with the finish reason of each choice that ended. Advances the parsers
    and `sent_logprobs` (per choice: logprob entries already sent)."""
    choices, finished = [], []
    for c in out.outputs:
        if c.finish_reason is None and not c.delta_token_ids:
            continue
        parser = parsers[c.index]
        delta = parser.delta(c.text, c.finish_reason is not None)
        lp = None
        if c.logprobs is not None:
            lp, sent_logprobs[c.index] = chat_logprobs(c.logprobs[sent_logprobs[c.index]:], tok), len(c.logprobs)
        if delta or lp:
            choices.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None})
        if c.finish_reason is not None:  # the last chunk of a choice: empty delta, finish_reason
            finished.append({"index": c.index, "delta": {}, "logprobs": None,
                             "finish_reason": finish_reason(c, parser.args)})
    return choices, finished


def streamed_reasoning_tokens(parsers: list[OutputParser], tok) -> int:
    return sum(len(tok.encode(p.sent[0])) for p in parsers if p.sent[0])


# ---- text completions -----------------------------------------------------------------------------------------
def text_completion(head: dict, prompts: list[tuple[list[int], str]], lasts: list[RequestOutput], echo: bool,
                    n: int, tok) -> dict:
    """The `text_completion` body of finished requests, one per prompt given as (ids, text); prompt i's choices
    are numbered i * n + their index; `echo` puts the prompt text before each choice's text."""
    choices = []
    for i, ((_, text), last) in enumerate(zip(prompts, lasts)):
        echoed = text if echo else ""
        for c in last.outputs:
            lp = completion_logprobs(c.logprobs, len(echoed), tok) if c.logprobs is not None else None
            choices.append({"index": i * n + c.index, "text": echoed + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
    total = usage([(len(ids), last) for (ids, _), last in zip(prompts, lasts)])
    return head | {"object": "text_completion", "choices": choices, "usage": total}


def completion_deltas(out: RequestOutput, i: int, n: int, echoed: str, sent_logprobs: dict[int, int],
                      tok) -> list[dict]:
    """The choices of the stream chunk one engine output of prompt i makes: each choice's new text (its first
    chunk led by `echoed`) and logprobs (offsets from 0 within the chunk). Advances `sent_logprobs` (choice
    index -> logprob entries already sent; a choice is in it once its first chunk was made)."""
    choices = []
    for c in out.outputs:
        idx = i * n + c.index
        first = idx not in sent_logprobs
        text = (echoed if first else "") + c.delta_text
        lp = None
        if c.logprobs is not None:
            lp = completion_logprobs(c.logprobs[sent_logprobs.get(idx, 0):], 0, tok)
            sent_logprobs[idx] = len(c.logprobs)
        else:
            sent_logprobs[idx] = 0
        if text or c.finish_reason is not None:
            choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return choices
