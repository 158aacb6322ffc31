"""What the parallel training path costs and gives: `dsv3 train` in one process, then the same run under torchrun
at world size 1 (FSDP2 wrapping, EP 1: the goal is within 5% of the plain loop), then on every GPU of the machine
data-parallel and, with --ep, expert-parallel (scaling efficiency = tokens/s over N x the one-process rate). Each
run is its own process; tokens/s is the median of the second half of the steps (rank 0's log, global tokens).

    python benchmarks/bench_parallel.py --preset bench-684m --batch-size 8 --seq-len 2048 --data TOK/data \\
        --tokenizer TOK/tokenizer --model-vocab-size 32000                                # any number of GPUs
    python benchmarks/bench_parallel.py --preset tiny --batch-size 8 --seq-len 128 --steps 6 --nproc 2   # CPU
Writes benchmarks/results/bench_parallel_<preset>_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run(args, name: str, nproc: int, work: Path, *extra: str) -> dict:
    """nproc 0: plain `python -m dsv3 train`; else torchrun with nproc processes."""
    out = work / name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                 str(port), "-m", "dsv3"] if nproc else [sys.executable, "-m", "dsv3"])
    data = ["--data", args.data, "--tokenizer", args.tokenizer] if args.data else ["--vocab-size", "4096"]
    cmd = [*launcher, "train", "--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--steps", str(args.steps), "--warmup", "2", "--lr", "1e-4", "--no-mtp",
           "--eval-every", "1000000", "--eval-batches", "1", "--save-every", "1000000", "--out", str(out),
           "--model-vocab-size", str(args.model_vocab_size), *data, *args.train_args.split(), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-1500:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][args.steps // 2:]
    return {"processes": max(nproc, 1), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "loss_last": rows[-1]["loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2, help="processes for the N-rank runs")
    p.add_argument("--ep", type=int, default=0, help="also an expert-parallel run with this group size")
    p.add_argument("--data", help="a token directory (a run's data/); default: the shipped corpus")
    p.add_argument("--tokenizer", help="with --data: the tokenizer it was built with")
    p.add_argument("--model-vocab-size", type=int, default=0)
    p.add_argument("--train-args", default="", help="more `dsv3 train` flags for every run, e.g. '--param-dtype bf16'")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        args.train_args += " --device cpu --threads 1"
    work = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    res = {"plain": run(args, "plain", 0, work), "torchrun x1": run(args, "torchrun1", 1, work)}
    if args.nproc > 1:
        res[f"dp x{args.nproc}"] = run(args, "dp", args.nproc, work)
        if args.ep:
            res[f"dp+ep{args.ep} x{args.nproc}"] = run(args, "ep", args.nproc, work, "--ep", str(args.ep))
    base = res["plain"].get("tokens_per_s")
    print(f"\n{args.preset} {args.batch_size}x{args.seq_len}, {args.steps} steps, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'run':<18}{'tokens/s':>12}{'vs plain':>10}{'per-process efficiency':>24}")
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<18} failed: {r['error'][-300:]}")
            continue
        r["over_plain"] = r["tokens_per_s"] / base if base else None
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["processes"] * base) if base else None
        print(f"{name:<18}{r['tokens_per_s']:>12,.0f}{r['over_plain'] or 0:>9.3f}x"
              f"{r['scaling_efficiency'] or 0:>23.3f}")
    out = Path(__file__).parent / "results" / f"bench_parallel_{args.preset}_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": torch.cuda.get_device_name() if cuda else "cpu",
                               "torch": torch.__version__, "results": res}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
