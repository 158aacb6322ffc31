"""How `dsv3 train` scales over the GPUs of one machine, and what its parallel code path costs at world size 1.

For each model, every layout is its own `dsv3 train` process group on the same token files:
  1 GPU          plain `python -m dsv3 train`: the reference
  torchrun x1    the parallel code path at world size 1 (FSDP2 wrapping, EP 1, PP 1): goal within 5% of plain
  DP xN          FSDP2 over all N GPUs
  EP N           routed experts split over the N GPUs (all-to-all dispatch and combine), the rest FSDP2
  DP x EP        (N >= 4) experts over groups of N/2 GPUs
  PP N 1F1B / DualPipeV   layer ranges over the N GPUs, both uncompiled, the same micro-batches
Weak scaling: every GPU gets the 1-GPU run's batch (the global batch is N times larger), so scaling efficiency
= tokens/s per GPU over the 1-GPU run's tokens/s. The last --profile steps of each run are profiled
(`dsv3 train --profile-steps`): per GPU, the share of the step in NCCL send/recv kernels (EP's all-to-all, PP's
stage-to-stage sends), in collectives (FSDP's all-gather / reduce-scatter) and the busy fraction (compute
kernels / step). A pipeline's bubble is estimated as its idle fraction minus the 1-GPU run's (launch gaps both
have), beside the 1F1B formula (p − 1) / (m + p − 1). Peak memory is per GPU (torch's allocator).

Models: bench-684m (12 layers, 64 experts of width 256) and v2lite-8l (DeepSeek-V2-Lite's layers: hidden 2048,
64 experts of width 1408, top-6, 2 shared; 8 layers, so DualPipeV runs up to PP 4; 2 N layers from 8 GPUs).

    python -m benchmarks.scaling.layouts --data TOK/data --tokenizer TOK/tokenizer     # every GPU of the machine
    python -m benchmarks.scaling.layouts --models tiny --seq-len 128 --batch-size 4 --steps 6 --profile 2  # CPU
`--gpus 1`: the world-size-1 check alone; `--train-args '--param-dtype bf16 --compile'` for compiled runs.
Results: docs/scaling.md; saved as benchmarks/results/scaling/layouts-<tag or models>_<N>x<device>_<date>.json (a
1-GPU run's device has no count), the figure in docs/img/scaling/. benchmarks/scaling/model.py reads the 1-GPU runs'
step times and the all-to-all bandwidth from these files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from benchmarks.results import device_name, save

MODELS = {"bench-684m": ["--preset", "bench-684m"],
          "v2lite-8l": ["--preset", "deepseek-v2-lite", "--num-layers", "8"],
          "tiny": ["--preset", "tiny"]}  # CPU smoke


def layouts(n: int, layers: int) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, extra `dsv3 train` flags); 0 processes = plain `python -m dsv3 train`."""
    runs = {"1 GPU": (0, []), "torchrun x1": (1, [])}
    if n > 1:
        runs[f"DP x{n}"] = (n, [])
        runs[f"EP {n}"] = (n, ["--ep", str(n)])
        if n >= 4:
            runs[f"DP {2} x EP {n // 2}"] = (n, ["--ep", str(n // 2)])
        for sched in ("1f1b", "dualpipev"):
            if layers >= n * (2 if sched == "dualpipev" else 1):
                runs[f"PP {n} {sched}"] = (n, ["--pp", str(n), "--pp-schedule", sched,
                                                "--pp-microbatches", str(4 * n)])
    return runs


def train(args, model: str, name: str, procs: int, extra: list[str], n: int, work: Path) -> dict:
    out = work / f"{model}_{re.sub(r'[^a-z0-9]+', '_', name.lower())}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
                 str(port), "-m", "dsv3"] if procs else [sys.executable, "-m", "dsv3"])
    batch = args.batch_size * (n if procs > 1 else 1)
    data = ["--data", args.data, "--tokenizer", args.tokenizer] if args.data else ["--vocab-size", "1024"]
    cmd = [*launcher, "train", *MODELS[model], *extra, "--batch-size", str(batch), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--profile-steps", str(args.profile), "--warmup", "2", "--lr", "1e-4",
           "--no-mtp", "--eval-every", "1000000", "--eval-batches", "1", "--save-every", "1000000",
           "--out", str(out), "--model-vocab-size", str(args.model_vocab_size), *data, *args.train_args.split()]
    if model == "v2lite-8l" and n >= 8:
        cmd += ["--num-layers", str(2 * n)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the end-of-run save: 50 GB for v2lite-8l
    steps = [r for r in rows if "tokens_per_s" in r and not r.get("profiled")]
    ranks = next(r["ranks"] for r in rows if "ranks" in r)
    tok_s = statistics.median(r["tokens_per_s"] for r in steps[len(steps) // 2:])
    gpus = max(procs, 1)
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in ranks)  # noqa: E731
    res = {"gpus": gpus, "batch": batch, "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / gpus,
           "peak_memory_gib": [r.get("peak_memory_gib", r.get("peak_rss_gib")) for r in ranks],
           "step_ms": mean("step_ms"), "sendrecv_share": mean("nccl_sendrecv_ms") / mean("step_ms"),
           "collective_share": mean("nccl_collective_ms") / mean("step_ms"), "busy": mean("busy"),
           "busy_per_gpu": [r.get("busy") for r in ranks], "loss_last": steps[-1]["loss"]}
    if "--pp" in extra:
        p, m = int(extra[extra.index("--pp") + 1]), int(extra[extra.index("--pp-microbatches") + 1])
        res["bubble_1f1b_formula"] = (p - 1) / (m + p - 1)
    return res


def alltoall_worker(n_mb: list[int]) -> None:
    """Under torchrun: all_to_all_single of bf16 buffers of each size (MiB per rank); rank 0 prints the bandwidth
    out of each rank, (N − 1) / N of the buffer leaving it, as one JSON line."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    n, dev = dist.get_world_size(), torch.device("cuda" if cuda else "cpu")
    res = []
    for mb in n_mb:
        x = torch.ones(mb * 2**19 // n * n, dtype=torch.bfloat16, device=dev)
        y = torch.empty_like(x)
        for i in range(13):
            if i == 3:
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
            dist.all_to_all_single(y, x)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 10
        res.append({"mib_per_rank": mb, "ms": dt * 1e3, "gb_per_s_out_of_each_rank": x.nbytes * (n - 1) / n / dt / 1e9})
    if dist.get_rank() == 0:
        print(json.dumps(res))
    dist.destroy_process_group()


def alltoall(n: int) -> list[dict] | dict:
    """The all-to-all bandwidth of the machine's N processes, for the scaling model (benchmarks/scaling/model.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "-m", "benchmarks.scaling.layouts", "--alltoall-worker"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-1500:]}


def figure(results: dict, title: str) -> Figure:
    fig = Figure(figsize=(6 * len(results), 4.5))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (model, runs) in zip(axes[0], results.items()):
        names = [k for k, r in runs.items() if "error" not in r]
        r = [runs[k] for k in names]
        parts = {"compute": [x["busy"] for x in r], "NCCL send/recv": [x["sendrecv_share"] for x in r],
                 "NCCL collectives": [x["collective_share"] for x in r]}
        parts["other / idle"] = [max(0.0, 1 - sum(v[i] for v in parts.values())) for i in range(len(r))]
        bottom = [0.0] * len(r)
        for label, v in parts.items():
            ax.bar(names, v, bottom=bottom, label=label)
            bottom = [b + x for b, x in zip(bottom, v)]
        for i, x in enumerate(r):
            ax.text(i, 1.02, f"{x.get('scaling_efficiency') or 0:.0%}", ha="center", fontsize=9)
        ax.set(ylim=(0, 1.12), ylabel="share of the step (mean over GPUs)",
               title=f"{model}  (above: per-GPU tokens/s vs 1 GPU)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bench-684m,v2lite-8l", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 2,
                   help="processes of the multi-process runs (default: every GPU; 2 on a CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    p.add_argument("--profile", type=int, default=3, help="profiled steps at the end of each run")
    p.add_argument("--data", help="a token directory (a run's data/); default: the shipped corpus")
    p.add_argument("--tokenizer", help="with --data: the tokenizer it was built with")
    p.add_argument("--model-vocab-size", type=int, default=32000)
    p.add_argument("--only", default="", help="comma-separated layout names to run (default: all)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--train-args", default="--param-dtype bf16", help="more `dsv3 train` flags for every run")
    p.add_argument("--tag", default="", help="names the results file (default: the models)")
    p.add_argument("--alltoall-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def run_layouts(args, model: str, device: str, work: Path) -> dict:
    """Every layout of `model` on this machine (or those in --only): layout name -> its numbers."""
    layers = 12 if model == "bench-684m" else 4 if model == "tiny" else max(8, 2 * args.gpus)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    runs = {}
    print(f"\n{model}: {args.batch_size} x {args.seq_len} tokens per GPU, {args.steps} steps, {device}")
    print(f"{'layout':<20}{'tokens/s':>11}{'per GPU':>10}{'eff.':>7}{'peak GiB':>10}{'send/recv':>10}"
          f"{'collect.':>9}{'busy':>7}{'bubble':>8}")
    for name, (procs, extra) in layouts(args.gpus, layers).items():
        if only and name not in only:
            continue
        r = runs[name] = train(args, model, name, procs, extra, args.gpus, work)
        if "error" in r:
            print(f"{name:<20} failed: {r['error'][-600:]}", flush=True)
            continue
        base = runs.get("1 GPU", {}).get("tokens_per_s")
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base if base else None
        if "bubble_1f1b_formula" in r and "busy" in runs.get("1 GPU", {}):
            r["bubble_estimate"] = max(0.0, runs["1 GPU"]["busy"] - r["busy"])
        print(f"{name:<20}{r['tokens_per_s']:>11,.0f}{r['tokens_per_s_per_gpu']:>10,.0f}"
              f"{r['scaling_efficiency'] or 0:>7.3f}{max(r['peak_memory_gib']):>10.1f}"
              f"{r['sendrecv_share']:>10.1%}{r['collective_share']:>9.1%}{r['busy']:>7.1%}"
              f"{r.get('bubble_estimate', float('nan')):>8.1%}", flush=True)
    return runs


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    if args.alltoall_worker:
        return alltoall_worker([1, 8, 64, 256] if cuda else [1, 8])
    if not cuda:
        args.train_args += " --device cpu --threads 1"
        args.train_args = args.train_args.replace("--param-dtype bf16", "")
    device = device_name()
    tmp = tempfile.TemporaryDirectory(prefix="scaling_layouts_")  # removed at exit: runs save checkpoints at the end
    a2a = alltoall(args.gpus) if args.gpus > 1 else None
    if a2a:
        print("all_to_all_single, bf16:", ", ".join(
            f"{r['mib_per_rank']} MiB {r['gb_per_s_out_of_each_rank']:.1f} GB/s" for r in a2a)
            if isinstance(a2a, list) else a2a)
    results = {model: run_layouts(args, model, device, Path(tmp.name)) for model in args.models.split(",")}
    if args.gpus > 1:
        device = f"{args.gpus} x {device}"
    save(__file__, args, {"alltoall": a2a, "runs": results}, tag=args.tag or args.models.replace(",", "-"),
         device=device, figure=figure(results, f"dsv3 train scale-out, {device}"))


if __name__ == "__main__":
    main()
