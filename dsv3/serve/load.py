"""Load on an OpenAI-compatible server (`dsv3 serve` or any other): N concurrent clients, each sending streaming chat
requests back to back for T seconds. Measures time to first token (first content byte), the gaps between content
chunks (inter-token latency), completion tokens/s, failures, and checks that every stream ends with `data: [DONE]`.
Also the two steps before a load: a free port to start a server on, and waiting until it answers.

  python -m dsv3.serve.load http://127.0.0.1:8000/v1 MODEL --clients 8 --seconds 20 --max-tokens 32

Needs httpx (in the `dev` extra; `pip install httpx`). Used by tests/test_serve_load.py (bounded, loopback),
benchmarks/serve/under_load.py and scripts/editor_fim_check.py.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, usage, done, arrivals = None, None, False, []
    async with client.stream("POST", url + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"].get("message")}
            if any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                   for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
                ttft = arrivals[0] - t0
            usage = chunk.get("usage") or usage
    ok = done and usage is not None
    return {"ok": ok, "error": None if ok else "stream ended without usage or [DONE]", "ttft": ttft,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "completion_tokens": usage["completion_tokens"] if usage else 0, "seconds": time.perf_counter() - t0}


async def load(url: str, model: str, clients: int = 8, seconds: float = 20.0, max_tokens: int = 32,
               api_key: str | None = None, temperature: float = 0.7) -> dict:
    """Run the load; returns counts, TTFT percentiles (ms) and completion tokens/s over the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict] = []
    # What this process holds so far (torch, a model a benchmark built) out of the collector's sight: a full
    # collection over it is long, and a client that waits on one counts it as the server's latency
    # (measured: docs/serving.md#results).
    gc.collect()
    gc.freeze()
    deadline = time.perf_counter() + seconds

    async def client_loop(i: int, client: httpx.AsyncClient):
        k = 0
        while time.perf_counter() < deadline:
            body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Client {i}, question {k}: tell me a story."}]}
            try:
                results.append(await _one(client, url, body))
            except httpx.HTTPError as e:
                results.append({"ok": False, "error": repr(e)})
            k += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    ttfts = sorted(1e3 * r["ttft"] for r in good if r["ttft"] is not None)
    gaps = sorted(1e3 * g for r in good for g in r["gaps"])
    pct = (lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None)  # noqa: E731
    return {"clients": clients, "seconds": wall, "max_tokens": max_tokens, "requests": len(results),
            "failed": len(results) - len(good), "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
            "completion_tokens": sum(r["completion_tokens"] for r in good),
            "completion_tokens_per_s": sum(r["completion_tokens"] for r in good) / wall,
            "ttft_ms_p50": statistics.median(ttfts) if ttfts else None, "ttft_ms_p99": pct(ttfts, 0.99),
            "itl_ms_p50": statistics.median(gaps) if gaps else None, "itl_ms_p99": pct(gaps, 0.99)}


def rss_mib(pid: int) -> float:
    """Resident memory of a process (e.g. the server under load), MiB; Linux."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server about to start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0, headers: dict | None = None) -> None:
    """Until GET {url}/models answers 200 (the server process must stay alive meanwhile)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url", help="base URL including /v1")
    p.add_argument("model")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key")
    a = p.parse_args()
    print(json.dumps(asyncio.run(load(a.url, a.model, a.clients, a.seconds, a.max_tokens, a.api_key)), indent=2))


if __name__ == "__main__":
    sys.exit(main())
