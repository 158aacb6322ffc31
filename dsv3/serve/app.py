"""`dsv3 serve`: the DeepSeek/OpenAI-compatible HTTP API (../shared/API.md) over the inference engine.

Routes are served under "", "/v1" and "/beta". Each request is validated (protocol.py), turned into prompt ids
(chat template, Chat Prefix Completion, FIM), checked against the context, and handed to the engine thread
(async_engine.py); outputs come back as one JSON body or as server-sent events. Errors always have the
`{"error": {...}}` shape; an unexpected exception is a 500 for that request only.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from dsv3.infer.engine import Engine, RequestOutput
from dsv3.infer.sampler import SamplingParams
from dsv3.serve.admission import Admission
from dsv3.serve.async_engine import AsyncEngine, EngineError
from dsv3.serve import openai_format as fmt
from dsv3.serve.metrics import Metrics
from dsv3.infer.structured import Structured
from dsv3.serve.parsing import OutputParser
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from dsv3.tokenizer import THINK, THINK_END, fim_prompt

log = logging.getLogger("dsv3.serve")
ALIASES = ("deepseek-chat", "deepseek-reasoner")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_concurrent_per_key: int = 64  # requests in flight per key (or per server without keys): then 429
    max_queue: int = 512  # requests in the engine, all keys together: then 503
    max_request_bytes: int = 4 << 20
    max_n: int = 16
    default_max_tokens: int = 4096  # API.md; bounded by the context left
    fim_max_tokens: int = 4096
    keepalive_s: float = 15.0
    reasoning: bool | None = None  # the model thinks in <think>; None: when its chat template mentions </think>
    prefixes: tuple[str, ...] = ("", "/v1", "/beta")  # every route is served under each


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    tok = engine.tokenizer
    aengine = AsyncEngine(engine)
    reasons = config.reasoning  # the model thinks in <think>: its chat replies carry reasoning_content
    if reasons is None:
        reasons = THINK_END in str(tok.config.get("chat_template") or "")
    reasons = bool(reasons)
    admission = Admission(config.api_keys, config.max_concurrent_per_key, config.max_queue,
                          queued=lambda: aengine.num_requests)
    fingerprint = f"fp_dsv3_{engine.pool.seed.hex()[:10]}"
    max_len = engine.max_len
    grammars = Structured(tok, engine.model.config.vocab_size)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        aengine.shutdown()  # cancel what still runs, flush the prefix cache to disk

    app = FastAPI(title="dsv3", description="DeepSeek/OpenAI-compatible API over the dsv3 engine", lifespan=lifespan)
    app.state.engine, app.state.config = aengine, config

    # ---- errors --------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # 404, 405, ... in the same shape
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        error = fmt.validation_error(e.errors())
        return JSONResponse(error.body(), status_code=error.status)

    async def _size_limit_and_count(scope, receive, send, inner):
        # A plain ASGI wrapper (Starlette's @app.middleware pipes every streamed chunk through a task group and a
        # memory stream of its own).
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"").decode()
        try:
            if size.isdigit() and int(size) > config.max_request_bytes:
                body = APIError(400, f"request body of {size} bytes is over the limit of {config.max_request_bytes}")
                await JSONResponse(body.body(), status_code=400)(scope, receive, send_counted)
            else:
                await inner(scope, receive, send_counted)
        except Exception as e:  # a 500 for this request; the server goes on
            if status is not None:  # the response had begun: all that is left is to end it
                raise
            await _internal_error(e)(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            metrics.requests.labels(route.path if route else "unmatched", str(status or 500)).inc()

    app.add_middleware(_ASGIWrapper, handler=_size_limit_and_count)

    # ---- auth and admission --------------------------------------------------------------------------------
    def caller(request: Request) -> str:
        return admission.authenticate(request.headers.get("authorization", ""))

    def check_model(name: str) -> None:
        if name not in (config.model_name, *ALIASES):
            raise APIError(400, f"model {name!r} is not served here (this server serves {config.model_name!r})",
                           param="model", code="model_not_found")

    def budget(prompt_len: int, asked: int | None, cap: int) -> int:
        left = max_len - prompt_len
        if asked is None:
            if left < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context length is {max_len}")
            return min(cap, left)
        if prompt_len + asked > max_len:
            raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {asked}: together over the "
                                f"model's context length of {max_len} tokens", param="max_tokens")
        return asked

    def sampling(req, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if req.n > config.max_n:
            raise APIError(422, f"n={req.n} is over this server's limit of {config.max_n}", param="n")
        return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                              frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                              stop=req.stop or [], seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos)

    async def run(request: Request, key: str, rid: str, prompt_ids: list[int], params: SamplingParams,
                  stream: bool) -> AsyncIterator[RequestOutput | None]:
        """The engine's outputs for one request, counted against the key while in flight, logged once."""
        with admission.hold(key):
            metrics.prompt_tokens.inc(len(prompt_ids))
            t0, last = time.perf_counter(), None
            t_tok = None  # when the latest token arrived
            try:
                async for out in aengine.generate(rid, prompt_ids, params, config.keepalive_s if stream else None):
                    new = sum(len(c.delta_token_ids) for c in out.outputs) if out else 0
                    if new:
                        now = time.perf_counter()
                        if t_tok is None:
                            metrics.ttft.observe(now - t0)
                        else:
                            metrics.itl.observe((now - t_tok) / new)
                        t_tok = now
                        metrics.generation_tokens.inc(new)
                    last = out or last
                    yield out
            finally:
                done = last is not None and last.finished
                n_out = sum(len(c.token_ids) for c in last.outputs) if last else 0
                log.info("%s prompt=%d cached=%d completion=%d %s %.3fs", rid, len(prompt_ids),
                         last.num_cached_tokens if last else 0, n_out, "done" if done else "cancelled",
                         time.perf_counter() - t0)

    # ---- routes --------------------------------------------------------------------------------------------
    router = APIRouter()

    @router.get("/models")
    async def models(key: str = Depends(caller)):
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsv3", "context_length": max_len}]}

    @router.get("/health")
    async def health():
        return {"status": "ok", "requests": aengine.num_requests}

    @router.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, key: str = Depends(caller)):
        check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if choice != "none" else []
        if choice not in (None, "none", "auto") and not tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        if isinstance(choice, dict) and choice["function"].get("name") not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {choice['function'].get('name')!r}, which is not among the tools",
                           param="tool_choice")
        json_mode = req.response_format is not None and req.response_format.type == "json_object"
        if json_mode and tools:
            raise APIError(400, "response_format json_object cannot be combined with tools", param="response_format")
        try:
            ids = tok.apply_chat_template(messages, tools=tools or None, tokenize=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        thinking = reasons and tok.decode(ids[-8:]).rstrip().endswith(THINK)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, budget(len(ids), req.max_tokens, config.default_max_tokens), logprobs)
        # Constrained decoding: JSON mode; tool calls when a call is demanded or a tool is strict (its
        # arguments must match its schema); plain `auto` tools are parsed, not constrained.
        if json_mode:
            params.grammar = grammars.json_object()
        elif tools and (choice == "required" or isinstance(choice, dict)
                        or any(t["function"].get("strict") for t in tools)):
            try:
                params.grammar = grammars.tool_calls(tools, choice or "auto", reasons)
            except Exception as e:  # a parameters schema the grammar compiler rejects
                raise APIError(400, f"tools: cannot constrain calls to these parameter schemas ({e})",
                               param="tools") from e
        admission.admit(key)
        head = fmt.head(f"chatcmpl-{uuid.uuid4().hex}", req.model, fingerprint)
        rid = head["id"]

        parsers = [OutputParser(reasons, thinking, bool(tools)) for _ in range(params.n)]
        if not req.stream:
            last = await _until_disconnect(request, _last(run(request, key, rid, ids, params, False)))
            return fmt.chat_completion(head, last, parsers, reasons, len(ids), tok)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            yield fmt.chat_chunk(head, fmt.chat_role_choices(params.n), include_usage)
            last, sent_logprobs = None, [0] * params.n
            try:
                async for out in run(request, key, rid, ids, params, True):
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
                yield fmt.chat_chunk(head, [], include_usage, usage=fmt.usage([(len(ids), last)], thought))
            yield fmt.DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request, key: str = Depends(caller)):
        check_model(req.model)
        raw = req.prompt
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        if len(prompts) > config.max_n:
            raise APIError(422, f"{len(prompts)} prompts is over this server's limit of {config.max_n}",
                           param="prompt")
        cap = config.fim_max_tokens if req.suffix is not None else config.default_max_tokens
        jobs = []  # (prompt ids, prompt text for echo)
        for p in prompts:
            if isinstance(p, str):
                text = fim_prompt(p, req.suffix) if req.suffix is not None else p
                jobs.append((tok.encode(text, add_bos=True), p))
            else:
                if not p:
                    raise APIError(422, "a token-id prompt must not be empty", param="prompt")
                if req.suffix is not None:
                    raise APIError(400, "suffix (FIM) needs the prompt as text", param="suffix")
                if any(not 0 <= t < engine.model.config.vocab_size for t in p):
                    raise APIError(422, "prompt token ids must be in the vocabulary", param="prompt")
                jobs.append((list(p), tok.decode(p)))
        params = [sampling(req, budget(len(ids), req.max_tokens, cap), req.logprobs) for ids, _ in jobs]
        admission.admit(key)
        head = fmt.head(f"cmpl-{uuid.uuid4().hex}", req.model, fingerprint)
        rid = head["id"]

        streams = [run(request, key, f"{rid}-{i}", ids, sp, req.stream) for i, ((ids, _), sp) in
                   enumerate(zip(jobs, params))]
        if not req.stream:
            lasts = await _until_disconnect(request, asyncio.gather(*(_last(s) for s in streams)))
            return fmt.text_completion(head, jobs, lasts, req.echo, req.n, tok)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i, s):
                try:
                    async for out in s:
                        await queue.put((i, out))
                except EngineError as e:
                    await queue.put((i, e))
                finally:
                    await queue.put((i, StopAsyncIteration()))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            try:
                lasts, sent_logprobs, live = [None] * len(jobs), {}, len(tasks)
                while live:
                    i, out = await queue.get()
                    if isinstance(out, StopAsyncIteration):
                        live -= 1
                        continue
                    if out is None:
                        yield fmt.KEEP_ALIVE
                        continue
                    if isinstance(out, EngineError):
                        yield fmt.error_event(out)
                        return
                    lasts[i] = out
                    echoed = jobs[i][1] if req.echo else ""
                    choices = fmt.completion_deltas(out, i, req.n, echoed, sent_logprobs, tok)
                    if choices:
                        yield fmt.sse(head | {"object": "text_completion", "choices": choices})
                if include_usage and all(lasts):
                    total = fmt.usage([(len(ids), last) for (ids, _), last in zip(jobs, lasts)])
                    yield fmt.sse(head | {"object": "text_completion", "choices": [], "usage": total})
                yield fmt.DONE
            finally:
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(Path(__file__).parent / "static" / "chat.html", media_type="text/html")

    for prefix in config.prefixes:
        app.include_router(router, prefix=prefix)
    return app


class _ASGIWrapper:
    """`handler(scope, receive, send, inner)` around the rest of the app, as ASGI middleware."""

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        await self.handler(scope, receive, send, self.app)


def _internal_error(e: Exception) -> JSONResponse:
    rid = uuid.uuid4().hex[:12]
    log.error("internal error (%s): %s: %s", rid, type(e).__name__, e, exc_info=e)
    return JSONResponse(APIError(500, f"internal error (reference {rid})", type="server_error").body(),
                        status_code=500)


async def _last(stream: AsyncIterator[RequestOutput | None]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out or last
    if last is None or not last.finished:
        raise EngineError("the request ended without a result")
    return last


async def _until_disconnect(request: Request, awaitable):
    """Await `awaitable`, cancelling it (and so its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        task.cancel()
