"""What every route shares: the server's configuration, and the model as served (the engine's thread, tokenizer,
grammars, admission, metrics), built once per app and read by routes as `request.app.state.service`.

`Service.generate` is the one way a route runs a request on the engine: it counts the request against its API key
while it generates, meters its tokens and logs it once when it ends.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from dsv3.infer.engine import Engine, RequestOutput
from dsv3.infer.sampler import SamplingParams
from dsv3.infer.structured import Structured
from dsv3.serve.admission import Admission
from dsv3.serve.async_engine import AsyncEngine, EngineError
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import APIError
from dsv3.tokenizer import THINK_END, Tokenizer

log = logging.getLogger("dsv3.serve")
ALIASES = ("deepseek-chat", "deepseek-reasoner")  # DeepSeek's model names, accepted for the served model


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_concurrent_per_key: int = 64  # requests in flight per key (or per server without keys): then 429
    max_queue: int = 512  # requests in the engine, all keys together: then 503
    max_request_bytes: int = 4 << 20
    max_n: int = 16
    default_max_tokens: int = 4096  # docs/api.md#chat-completions; bounded by the context left
    fim_max_tokens: int = 4096
    keepalive_s: float = 15.0
    reasoning: bool | None = None  # the model thinks in <think>; None: when its chat template mentions </think>
    prefixes: tuple[str, ...] = ("", "/v1", "/beta")  # every route is served under each


@dataclass
class Service:
    config: ServerConfig
    engine: AsyncEngine
    tokenizer: Tokenizer
    grammars: Structured  # JSON mode and tool-call grammars for constrained decoding
    admission: Admission
    metrics: Metrics
    reasoning: bool  # config.reasoning, resolved: chat replies carry reasoning_content
    fingerprint: str  # system_fingerprint: the engine's sampling seed
    max_len: int  # the model's context length
    vocab_size: int

    @classmethod
    def build(cls, engine: Engine, config: ServerConfig) -> Service:
        tok, aengine = engine.tokenizer, AsyncEngine(engine)
        reasoning = config.reasoning
        if reasoning is None:
            reasoning = THINK_END in str(tok.config.get("chat_template") or "")
        admission = Admission(config.api_keys, config.max_concurrent_per_key, config.max_queue,
                              queued=lambda: aengine.num_requests)
        vocab_size = engine.model.config.vocab_size
        return cls(config, aengine, tok, Structured(tok, vocab_size), admission, Metrics(engine), bool(reasoning),
                   f"fp_dsv3_{engine.pool.seed.hex()[:10]}", engine.max_len, vocab_size)

    def check_model(self, name: str) -> None:
        if name not in (self.config.model_name, *ALIASES):
            raise APIError(400, f"model {name!r} is not served here (this server serves {self.config.model_name!r})",
                           param="model", code="model_not_found")

    async def generate(self, key: str, rid: str, prompt_ids: list[int], params: SamplingParams,
                       stream: bool) -> AsyncIterator[RequestOutput | None]:
        """The engine's outputs for one request (for a stream, None after keepalive_s without one), counted
        against `key` while in flight, metered, logged once."""
        heartbeat = self.config.keepalive_s if stream else None
        with self.admission.hold(key):
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            t0, last = time.perf_counter(), None
            t_tok = None  # when the latest token arrived
            try:
                async for out in self.engine.generate(rid, prompt_ids, params, heartbeat):
                    new = sum(len(c.delta_token_ids) for c in out.outputs) if out else 0
                    if new:
                        now = time.perf_counter()
                        if t_tok is None:
                            self.metrics.ttft.observe(now - t0)
                        else:
                            self.metrics.itl.observe((now - t_tok) / new)
                        t_tok = now
                        self.metrics.generation_tokens.inc(new)
                    last = out or last
                    yield out
            finally:
                _log_request(rid, len(prompt_ids), last, time.perf_counter() - t0)


def _log_request(rid: str, prompt_len: int, last: RequestOutput | None, seconds: float) -> None:
    done = last is not None and last.finished
    n_out = sum(len(c.token_ids) for c in last.outputs) if last else 0
    log.info("%s prompt=%d cached=%d completion=%d %s %.3fs", rid, prompt_len, last.num_cached_tokens if last else 0,
             n_out, "done" if done else "cancelled", seconds)


def caller(request: Request) -> str:
    """A route's dependency: the request's API key ('' without keys), or a 401."""
    service: Service = request.app.state.service
    return service.admission.authenticate(request.headers.get("authorization", ""))


async def last_output(stream: AsyncIterator[RequestOutput | None]) -> RequestOutput:
    """The final output of a request that is not streamed."""
    last = None
    async for out in stream:
        last = out or last
    if last is None or not last.finished:
        raise EngineError("the request ended without a result")
    return last


async def until_disconnect(request: Request, awaitable):
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
