"""The engine on a thread of its own, fed by coroutines: the bridge between the HTTP server and `Engine`.

One thread owns the Engine and runs `step()` while any request is unfinished. Coroutines hand it requests and
aborts through a locked inbox and read their outputs from an asyncio queue each; the thread posts outputs with
`call_soon_threadsafe`, so the event loop never waits for a forward. A request whose reader goes away (client
disconnect, cancellation) is aborted, which frees its blocks at once. An exception inside a step fails the
requests that were running, is logged, and the thread goes on serving.

Which thread: `start()` makes one (tests, an app served from a thread); `dsv3 serve` instead drives the engine
from the process's main thread (`drive()`) and serves HTTP from another. NOTE: on a CPU, torch's OpenMP ops issued
from a thread other than the main one pay a fixed cost per parallel region (libgomp), which slows a small model's
decode step markedly (measured: docs/inference.md#cpu-engine).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from dsv3.infer.engine import Engine, RequestOutput
from dsv3.infer.sampler import SamplingParams

log = logging.getLogger("dsv3.serve")


class EngineError(RuntimeError):
    """The engine failed while running this request (the server keeps serving others)."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._readers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = True  # until start()
        self._thread: threading.Thread | None = None
        self._driven = False  # drive() runs the loop on its caller's thread
        self._closed = False  # drive() returns
        self._idle = threading.Event()  # no loop is running
        self._idle.set()

    def start(self) -> None:
        """Open for requests and run the engine loop (the server's startup; again after a shutdown): on the thread
        that drive()s it, else on a new thread."""
        with self._wake:
            self._stop = False
            if self._driven:
                self._wake.notify_all()
                return
            if self._thread is not None and self._thread.is_alive():
                return
            self._idle.clear()
            self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
            self._thread.start()

    def drive(self) -> None:
        """Run the engine loop on the calling thread whenever the server is started, until close()."""
        with self._wake:
            self._driven = True
        while True:
            with self._wake:
                while self._stop and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._idle.clear()
            self._run()

    def close(self) -> None:
        """drive() returns (after shutdown(); or at once, if the server never started or shut down)."""
        with self._wake:
            self._stop = self._closed = True
            self._wake.notify_all()

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished (queued in the engine or running)."""
        return len(self._readers)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       heartbeat: float | None = None) -> AsyncIterator[RequestOutput | None]:
        """Outputs of one request as the engine produces them, the last one with `finished` set; with
        `heartbeat`, None whenever that many seconds pass without one (a stream's keep-alive)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self._stop:
                raise EngineError("the engine is not running (the server is starting or shutting down)")
            self._readers[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((request_id, prompt_ids, params))
            self._wake.notify()
        finished = False
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(queue.get(), heartbeat)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._readers.pop(request_id, None)
            self._aborts.append(request_id)
            self._wake.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel what is still running, stop the thread, and write the prefix cache to its disk tier."""
        with self._wake:
            self._stop = True
            for rid in list(self._readers):
                self._post(rid, EngineError("the server is shutting down"))
            self._wake.notify_all()
        if self._idle.wait(timeout):  # the loop left its step: the engine is ours to flush
            self.engine.flush_cache()
        else:
            log.error("the engine loop did not stop within %.0f s; the prefix cache was not flushed", timeout)

    # ---- the engine thread -------------------------------------------------------------------------------
    def _post(self, request_id: str, item) -> None:
        reader = self._readers.get(request_id)
        if reader is not None:
            loop, queue = reader
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._idle.set()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not (self._stop or self._adds or self._aborts or engine.has_unfinished()):
                    self._wake.wait()
                if self._stop:
                    for rid in list(engine.requests):
                        engine.abort(rid)
                    self._adds.clear()
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                engine.abort(rid)
            for rid, ids, params in adds:
                if rid not in self._readers:  # cancelled before it reached the engine
                    continue
                try:
                    engine.add_request(ids, params, request_id=rid)
                except Exception as e:  # validated by the server first; this is a last guard
                    self._finish(rid, e)
            if not engine.has_unfinished():
                continue
            try:
                outs = engine.step()
            except Exception as e:
                log.exception("engine step failed; failing the %d running requests", len(engine.requests))
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._finish(rid, EngineError(f"internal error in the engine: {type(e).__name__}"))
                continue
            for out in outs:
                if out.finished:
                    self._finish(out.request_id, out)
                else:
                    self._post(out.request_id, out)

    def _finish(self, request_id: str, item) -> None:
        with self._wake:
            self._post(request_id, item)
            self._readers.pop(request_id, None)
