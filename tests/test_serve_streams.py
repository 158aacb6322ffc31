"""A streamed text completion of several prompts without an app, over stand-ins for the engine's streams: the
prompts' outputs interleave into one SSE stream with keep-alives, usage and [DONE]; an engine failure ends it with
an error event and cancels the prompts still running."""
import asyncio
import json

from dsv3.infer.engine import CompletionOutput, RequestOutput
from dsv3.serve.async_engine import EngineError
from dsv3.serve.completions import _events


class Vocab:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def out(text, ids, delta, finish=None):
    return RequestOutput("r", [], [CompletionOutput(0, text, ids, delta, ids[-1:], finish)], 1, finish is not None)


async def collect(events):
    return [e async for e in events]


def test_prompts_interleave_with_echo_keep_alives_usage_and_done():
    async def first():
        yield out("b", [1], "b")
        yield out("bc", [1, 2], "c", "length")

    async def second():
        yield None  # waiting in the engine's queue
        yield out("d", [3], "d", "stop")

    head = {"id": "cmpl-1"}
    prompts = [([0, 0], "P0"), ([0, 0, 0], "P1")]
    events = asyncio.run(collect(_events([first(), second()], head, prompts, True, 1, True, Vocab())))
    assert events[-1] == "data: [DONE]\n\n" and events[2] == ": keep-alive\n\n"
    bodies = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in b["choices"]] for b in bodies] == [
        [(0, "P0b", None)], [(0, "c", "length")], [(1, "P1d", "stop")], []]
    assert all(b["id"] == "cmpl-1" and b["object"] == "text_completion" for b in bodies)
    assert bodies[-1]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_cache_hit_tokens": 2,
        "prompt_cache_miss_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 0}}


def test_an_engine_failure_ends_the_stream_and_cancels_the_other_prompts():
    cancelled = []

    async def failing():
        yield out("b", [1], "b")
        await asyncio.sleep(0.01)
        raise EngineError("internal error in the engine: RuntimeError")

    async def long():
        try:
            yield out("d", [3], "d")
            await asyncio.sleep(3600)
        finally:
            cancelled.append(True)

    async def main():
        events = await collect(_events([failing(), long()], {"id": "cmpl-1"}, [([0], "x"), ([0], "y")], False, 1,
                                       True, Vocab()))
        await asyncio.sleep(0)  # the cancelled pump runs its finally
        return events, list(cancelled)  # before asyncio.run's own exit cancels whatever is left

    events, cancelled_at_end = asyncio.run(main())
    assert json.loads(events[-1][6:]) == {"error": {"message": "internal error in the engine: RuntimeError",
                                                    "type": "server_error", "param": None, "code": None}}
    assert len(events) == 3 and "[DONE]" not in "".join(events)  # two chunks, then the error; no usage, no [DONE]
    assert cancelled_at_end == [True]
