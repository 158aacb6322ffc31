"""The server's admission rules without an app: API-key auth (401), requests in flight per key (429), requests in
the engine (503), and the per-key count released however a request ends."""
import asyncio

import pytest

from dsv3.serve.admission import Admission
from dsv3.serve.protocol import APIError


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
