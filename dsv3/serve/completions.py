"""`POST /completions`: raw text completion and, with `suffix`, fill-in-the-middle (docs/api.md#fim-completions).
One engine request per prompt (a prompt is text or token ids; several may come in one request), each with n
choices, numbered prompt * n + choice across the response.

A stream interleaves the prompts' outputs as the engine makes them; a choice's first chunk carries the echoed
prompt; keep-alive comments while requests wait; with `include_usage`, a last chunk with the usage of all
prompts; then [DONE].
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from dsv3.infer.engine import RequestOutput
from dsv3.serve import openai_format as fmt
from dsv3.serve.async_engine import EngineError
from dsv3.serve.inputs import completion_inputs
from dsv3.serve.protocol import CompletionRequest
from dsv3.serve.service import Service, caller, last_output, until_disconnect

router = APIRouter()


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, key: str = Depends(caller)):
    service: Service = request.app.state.service
    service.check_model(req.model)
    prompts, params = completion_inputs(service, req)
    service.admission.admit(key)
    head = fmt.head(f"cmpl-{uuid.uuid4().hex}", req.model, service.fingerprint)
    streams = [service.generate(key, f"{head['id']}-{i}", ids, sp, req.stream)
               for i, ((ids, _), sp) in enumerate(zip(prompts, params))]
    tok = service.tokenizer
    if not req.stream:
        lasts = await until_disconnect(request, asyncio.gather(*(last_output(s) for s in streams)))
        return fmt.text_completion(head, prompts, lasts, req.echo, req.n, tok)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _events(streams, head, prompts, req.echo, req.n, include_usage, tok)
    return StreamingResponse(events, media_type="text/event-stream")


async def _events(streams: list[AsyncIterator[RequestOutput | None]], head: dict,
                  prompts: list[tuple[list[int], str]], echo: bool, n: int, include_usage: bool,
                  tok) -> AsyncIterator[str]:
    lasts: list[RequestOutput | None] = [None] * len(prompts)
    sent_logprobs: dict[int, int] = {}
    async with aclosing(_merged(streams)) as outputs:  # closed on every exit: the requests still running end
        async for i, out in outputs:
            if out is None:
                yield fmt.KEEP_ALIVE
                continue
            if isinstance(out, EngineError):
                yield fmt.error_event(out)
                return
            lasts[i] = out
            echoed = prompts[i][1] if echo else ""
            choices = fmt.completion_deltas(out, i, n, echoed, sent_logprobs, tok)
            if choices:
                yield fmt.sse(head | {"object": "text_completion", "choices": choices})
    if include_usage and all(lasts):
        total = fmt.usage([(len(ids), last) for (ids, _), last in zip(prompts, lasts)])
        yield fmt.sse(head | {"object": "text_completion", "choices": [], "usage": total})
    yield fmt.DONE


async def _merged(streams: list[AsyncIterator[RequestOutput | None]]
                  ) -> AsyncIterator[tuple[int, RequestOutput | EngineError | None]]:
    """(stream index, output) from all streams as they come, until all have ended; a stream's EngineError is
    yielded in its place rather than raised. Closing this generator cancels the streams still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput | None]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except EngineError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, out = await queue.get()
            if isinstance(out, StopAsyncIteration):
                live -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
