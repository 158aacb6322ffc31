"""Who may submit a request now: the API key (401), the requests in flight per key (429), the requests in the
engine, all keys together (503). The errors and their codes are the API's (docs/api.md#errors).

`admit` decides before a request is handed to the engine; `hold` counts it against its key from the moment its
generation starts until it ends, finished, failed or cancelled. A request admitted but not yet started is not
counted, so requests that arrive together may pass `admit` together.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dsv3.serve.protocol import APIError


class Admission:
    def __init__(self, api_keys: frozenset[str], max_per_key: int, max_queue: int, queued: Callable[[], int]):
        self.api_keys = api_keys  # empty: no authentication, every request counts against the key ''
        self.max_per_key = max_per_key
        self.max_queue = max_queue
        self.queued = queued  # requests in the engine now (queued or running), all keys together
        self.in_flight: Counter[str] = Counter()  # API key -> requests generating now

    def authenticate(self, authorization: str) -> str:
        """The API key of an `Authorization: Bearer <key>` header ('' when the server has no keys); 401 when
        keys are required and this is not one of them."""
        if not self.api_keys:
            return ""
        key = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if key not in self.api_keys:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")
        return key

    def admit(self, key: str) -> None:
        """Raise 429 when the key has its limit of requests in flight, else 503 when the engine is full."""
        if self.in_flight[key] >= self.max_per_key:
            raise APIError(429, f"too many concurrent requests for this key (limit {self.max_per_key})",
                           type="rate_limit_error", code="rate_limit_exceeded")
        if self.queued() >= self.max_queue:
            raise APIError(503, "the server is overloaded; retry later", type="server_error", code="overloaded")

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Count one request against `key` for the duration of the block (released however the block ends)."""
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
