"""The server's admission rules without an app: API-key auth (401), requests in flight per key (429), requests in
the engine (503), and the per-key count released however a request ends (also through Service.generate, over a
stand-in for the engine thread)."""
import asyncio

import pytest

from dsv3.infer.engine import CompletionOutput, RequestOutput
from dsv3.infer.sampler import SamplingParams
from dsv3.serve.admission import Admission
from dsv3.serve.metrics import Metrics
from dsv3.serve.protocol import APIError
from dsv3.serve.service import ServerConfig, Service, last_output


def status_of(fn, *args):
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value.status, e.value.type, e.value.code


def test_a_key_past_its_limit_in_flight_is_429_and_other_keys_pass():
    a = Admission(frozenset({"k1", "k2"}), max_per_key=2, max_queue=100, queued=lambda: 0)
    with a.hold("k1"):
        a.admit("k1")  # one in flight: a second may come
        with a.hold("k1"):
            assert status_of(a.admit, "k1") == (429, "rate_limit_error", "rate_limit_exceeded")
            a.admit("k2")  # the limit is per key
        a.admit("k1")  # released: below the limit again
    assert a.in_flight["k1"] == 0


def test_an_engine_past_its_queue_is_503_for_every_key():
    queued = [4]
    a = Admission(frozenset(), max_per_key=1, max_queue=5, queued=lambda: queued[0])
    a.admit("")  # 4 requests in the engine, 5 allowed
    queued[0] = 5
    assert status_of(a.admit, "") == (503, "server_error", "overloaded")
    with a.hold(""):  # at both limits, the key's own limit is reported first
        assert status_of(a.admit, "")[0] == 429


def test_the_count_is_released_when_a_request_fails_or_is_cancelled():
    a = Admission(frozenset(), max_per_key=1, max_queue=100, queued=lambda: 0)
    with pytest.raises(RuntimeError), a.hold(""):
        raise RuntimeError("the engine failed")
    assert a.in_flight[""] == 0

    async def generate(started: asyncio.Event):  # a request generating tokens until it is cancelled
        with a.hold(""):
            started.set()
            await asyncio.sleep(3600)

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(generate(started))
        await started.wait()
        assert a.in_flight[""] == 1 and status_of(a.admit, "")[0] == 429
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert a.in_flight[""] == 0
    a.admit("")


@pytest.mark.parametrize("header, key", [("Bearer k1", "k1"), ("bearer   k2 ", "k2"), ("BEARER k1", "k1")])
def test_a_bearer_key_among_the_keys_is_the_caller(header, key):
    assert Admission(frozenset({"k1", "k2"}), 1, 1, lambda: 0).authenticate(header) == key


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer k3", "Basic k1", "k1", "Bearer k1x"])
def test_a_missing_or_unknown_key_is_401(header):
    a = Admission(frozenset({"k1", "k2"}), 1, 1, lambda: 0)
    assert status_of(a.authenticate, header) == (401, "authentication_error", "invalid_api_key")


def test_without_keys_every_caller_is_the_same_anonymous_key():
    a = Admission(frozenset(), 1, 1, lambda: 0)
    assert a.authenticate("") == a.authenticate("Bearer anything") == ""


class FakeEngine:
    """AsyncEngine's generate: one output per token of `tokens`, the last one finished; `hang` waits forever
    before finishing (a long generation)."""

    def __init__(self, tokens=3, hang=False):
        self.tokens, self.hang, self.heartbeats, self.num_requests = tokens, hang, [], 0

    async def generate(self, rid, prompt_ids, params, heartbeat=None):
        self.heartbeats.append(heartbeat)
        for k in range(1, self.tokens + 1):
            done = k == self.tokens and not self.hang
            yield RequestOutput(rid, prompt_ids, [CompletionOutput(0, "x" * k, [7] * k, "x", [7])], 0, done)
        if self.hang:
            await asyncio.sleep(3600)


def service(engine):
    config = ServerConfig(model_name="m", max_concurrent_per_key=1, keepalive_s=2.5)
    admission = Admission(frozenset(), 1, 10, queued=lambda: engine.num_requests)
    return Service(config, engine, None, None, admission, Metrics(engine), False, "fp", 100, 10)


def test_a_request_counts_against_its_key_until_it_finishes_or_is_cancelled():
    async def main():
        s = service(FakeEngine(tokens=3))
        outs = []
        async for out in s.generate("", "r1", [1, 2], SamplingParams(), stream=True):
            assert s.admission.in_flight[""] == 1 and status_of(s.admission.admit, "")[0] == 429
            outs.append(out)
        assert [o.finished for o in outs] == [False, False, True] and s.admission.in_flight[""] == 0
        assert s.engine.heartbeats == [2.5]  # a stream gets keep-alive ticks
        sample = s.metrics.registry.get_sample_value
        assert sample("dsv3_generation_tokens_total") == 3 and sample("dsv3_prompt_tokens_total") == 2

        s = service(FakeEngine(tokens=1, hang=True))
        task = asyncio.create_task(last_output(s.generate("", "r2", [1], SamplingParams(), stream=False)))
        while not s.admission.in_flight[""]:
            await asyncio.sleep(0.01)
        task.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.admission.in_flight[""] == 0 and s.engine.heartbeats == [None]
        s.admission.admit("")  # admitted again

    asyncio.run(main())
