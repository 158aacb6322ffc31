"""`GET /metrics` in Prometheus text format (prometheus_client): requests by route and status, tokens in and out,
time to first token and inter-token latency, and the engine's state read at scrape time (queue length, running
requests, KV blocks in use, prefix-cache hit ratio per tier: device pool, host memory, disk)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv3.infer.engine import Engine

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv3_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("dsv3_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "submission to first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("dsv3_inter_token_latency_seconds", "time between generated tokens of a request",
                             buckets=_LATENCY, registry=r)
        r.register(_EngineState(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        pool, store, bs = e.pool, e.store, e.pool.block_size
        yield GaugeMetricFamily("dsv3_queue_length", "requests waiting for admission", value=len(e.scheduler.waiting))
        yield GaugeMetricFamily("dsv3_running_sequences", "sequences in the running batch",
                                value=len(e.scheduler.running))
        yield GaugeMetricFamily("dsv3_kv_blocks_total", "blocks in the KV pool", value=pool.num_blocks)
        yield GaugeMetricFamily("dsv3_kv_blocks_in_use", "KV blocks referenced by sequences",
                                value=pool.num_blocks - pool.num_free)
        yield CounterMetricFamily("dsv3_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                                  value=pool.queries)
        # pool.hits counts every reused token; the second tier's share came back from host memory or disk.
        tiers = {"host": store.hits["host"] * bs, "disk": store.hits["disk"] * bs} if store else {}
        tiers = {"device": pool.hits - sum(tiers.values()), **tiers}
        hits = CounterMetricFamily("dsv3_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                   labels=["tier"])
        ratio = GaugeMetricFamily("dsv3_prefix_cache_hit_ratio", "hit tokens / queried tokens", labels=["tier"])
        for tier, n in tiers.items():
            hits.add_metric([tier], n)
            ratio.add_metric([tier], n / pool.queries if pool.queries else 0.0)
        yield hits
        yield ratio
