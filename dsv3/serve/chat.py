"""`POST /chat/completions` (docs/api.md#chat-completions): messages through the chat template (tools, Chat
Prefix Completion, reasoning), one engine request with n choices, answered as one body or as a stream.

A stream (docs/api.md#streaming) opens with a chunk giving each choice its role, then per engine output the new
content, reasoning and tool-call fragments, and a chunk with each finished choice's finish_reason; a keep-alive
comment while the request waits; with `include_usage`, a last chunk with usage and no choices; then [DONE].
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from dsv3.infer.engine import RequestOutput
from dsv3.serve import openai_format as fmt
from dsv3.serve.async_engine import EngineError
from dsv3.serve.inputs import chat_inputs
from dsv3.serve.parsing import OutputParser
from dsv3.serve.protocol import ChatCompletionRequest
from dsv3.serve.service import Service, caller, last_output, until_disconnect

router = APIRouter()


@router.post("/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request, key: str = Depends(caller)):
    service: Service = request.app.state.service
    service.check_model(req.model)
    job = chat_inputs(service, req)
    service.admission.admit(key)
    head = fmt.head(f"chatcmpl-{uuid.uuid4().hex}", req.model, service.fingerprint)
    parsers = [OutputParser(service.reasoning, job.thinking, bool(job.tools)) for _ in range(job.params.n)]
    outputs = service.generate(key, head["id"], job.ids, job.params, req.stream)
    if not req.stream:
        last = await until_disconnect(request, last_output(outputs))
        return fmt.chat_completion(head, last, parsers, service.reasoning, len(job.ids), service.tokenizer)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _events(outputs, head, parsers, len(job.ids), include_usage, service.tokenizer)
    return StreamingResponse(events, media_type="text/event-stream")


async def _events(outputs: AsyncIterator[RequestOutput | None], head: dict, parsers: list[OutputParser],
                  prompt_len: int, include_usage: bool, tok) -> AsyncIterator[str]:
    yield fmt.chat_chunk(head, fmt.chat_role_choices(len(parsers)), include_usage)
    last, sent_logprobs = None, [0] * len(parsers)
    try:
        async for out in outputs:
            if out is None:
                yield fmt.KEEP_ALIVE
                continue
            last = out
            for choices in fmt.chat_deltas(out, parsers, sent_logprobs, tok):
                if choices:
                    yield fmt.chat_chunk(head, choices, include_usage)
    except EngineError as e:
        yield fmt.error_event(e)
        return
    if include_usage and last is not None:
        thought = fmt.streamed_reasoning_tokens(parsers, tok)
        yield fmt.chat_chunk(head, [], include_usage, usage=fmt.usage([(prompt_len, last)], thought))
    yield fmt.DONE
