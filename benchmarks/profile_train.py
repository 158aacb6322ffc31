"""Where a `dsv3 train` step spends its time: the real Trainer (as bench_train.py runs it), a few warm-up steps,
then torch.profiler over `--steps` steps; prints the top GPU kernels by device time (on a CPU: ops by CPU time).

  python benchmarks/profile_train.py --preset 16b-slice --batch-size 4 --seq-len 4096 --model-vocab-size 102400
Writes benchmarks/results/profile_train_<preset>_<device>.json (the table's rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsv3.train.config import TrainConfig  # noqa: E402
from dsv3.train.loop import Trainer  # noqa: E402


KINDS = [("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "_grouped_fp8", "gemv")),
         ("attention", ("sdpa", "flash", "fmha", "attention")), ("optimizer", ("Adam", "multi_tensor")),
         ("fp8 quantize", ("_quant_",))]


def _kind(name: str) -> str:
    return next((k for k, subs in KINDS if any(s in name for s in subs)), "other")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-vocab-size", type=int, default=0)
    p.add_argument("--param-dtype", default="bf16")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--fp8-experts", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(preset=args.preset, out=tempfile.mkdtemp(prefix="profile_train_"), steps=10**6,
                      batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      model_vocab_size=args.model_vocab_size, mtp=False, param_dtype=args.param_dtype,
                      precision=args.precision, fp8_experts=args.fp8_experts,
                      compile=args.compile and cuda)
    trainer = Trainer(cfg)
    for _ in range(args.warmup):
        trainer.train_step()  # advances trainer.step
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # GPU: kernels only (an op's device time is its kernels', so counting both would count twice)
    events = [e for e in prof.key_averages() if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA
                                                            and not e.key.startswith("Optimizer."))]
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    classes = {}  # kernel classes: where a step goes, at a glance
    for e in events:
        k = _kind(e.key)
        classes[k] = classes.get(k, 0) + getattr(e, key) / 1e3 / args.steps
    rows = [{"name": e.key, "ms_per_step": getattr(e, key) / 1e3 / args.steps, "share": getattr(e, key) / total,
             "calls_per_step": e.count / args.steps} for e in events[: args.rows]]
    print(f"\n{'kernel / op':<90}{'ms/step':>9}{'share':>8}{'calls':>7}")
    for r in rows:
        print(f"{r['name'][:89]:<90}{r['ms_per_step']:>9.2f}{100 * r['share']:>7.1f}%{r['calls_per_step']:>7.0f}")
    print(f"total {total / 1e3 / args.steps:.1f} ms/step ({'device' if cuda else 'CPU'} time)")
    print("  ".join(f"{k} {v:.1f} ms ({100 * v / (total / 1e3 / args.steps):.0f}%)"
                    for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    tag = args.preset + ("_fp8" + ("-experts" if args.fp8_experts else "") if args.precision == "fp8" else "")
    out = Path(__file__).parent / "results" / f"profile_train_{tag}_{'cuda' if cuda else 'cpu'}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "classes_ms_per_step": classes,
                               "total_ms_per_step": total / 1e3 / args.steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
