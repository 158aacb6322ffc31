"""Where a `dsv3 train` step spends its time: the real Trainer (as benchmarks/train/loop.py runs it), a few warm-up
steps, then torch.profiler over `--steps` steps; the top GPU kernels by device time (on a CPU: ops by CPU time) and
the step split into GEMMs, attention, optimizer, FP8 quantization and the rest.

  python -m benchmarks.train.profile_step --preset 16b-slice --batch-size 4 --seq-len 4096 --model-vocab-size 102400
  python -m benchmarks.train.profile_step --preset v3-slice --batch-size 2 --model-vocab-size 32000 --precision fp8
Results: docs/fp8.md#fp8-training; saved as
benchmarks/results/train/profile_step-<preset>[-fp8[-experts]]_<device>_<date>.json (the table's rows).
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.results import save
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer


KINDS = [("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "_grouped_fp8", "gemv")),
         ("attention", ("sdpa", "flash", "fmha", "attention")), ("optimizer", ("Adam", "multi_tensor")),
         ("fp8 quantize", ("_quant_",))]


def _kind(name: str) -> str:
    return next((k for k, subs in KINDS if any(s in name for s in subs)), "other")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE trained on the shipped corpus")
    p.add_argument("--model-vocab-size", type=int, default=0, help="embedding rows when larger than the BPE's")
    p.add_argument("--param-dtype", default="bf16")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--fp8-experts", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="(GPU only)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled ones")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=30, help="kernels (ops) kept, by time")
    return p.parse_args()


def profile_steps(trainer, steps: int, cuda: bool) -> list:
    """Kernels (GPU) or ops (CPU) of `steps` train steps, by self time, longest first."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # GPU: kernels only (an op's device time is its kernels', so counting both would count twice)
    events = [e for e in prof.key_averages() if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA
                                                            and not e.key.startswith("Optimizer."))]
    return sorted(((e.key, getattr(e, key), e.count) for e in events), key=lambda e: -e[1])


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(preset=args.preset, out=tempfile.mkdtemp(prefix="profile_step_"), steps=10**6,
                      batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      model_vocab_size=args.model_vocab_size, mtp=False, param_dtype=args.param_dtype,
                      precision=args.precision, fp8_experts=args.fp8_experts,
                      compile=args.compile and cuda)
    trainer = Trainer(cfg)
    for _ in range(args.warmup):
        trainer.train_step()  # advances trainer.step
    events = profile_steps(trainer, args.steps, cuda)
    total = sum(us for _, us, _ in events)
    classes = {}  # kernel classes: where a step goes, at a glance
    for name, us, _ in events:
        k = _kind(name)
        classes[k] = classes.get(k, 0) + us / 1e3 / args.steps
    rows = [{"name": name, "ms_per_step": us / 1e3 / args.steps, "share": us / total, "calls_per_step": n / args.steps}
            for name, us, n in events[: args.rows]]
    print(f"\n{'kernel / op':<90}{'ms/step':>9}{'share':>8}{'calls':>7}")
    for r in rows:
        print(f"{r['name'][:89]:<90}{r['ms_per_step']:>9.2f}{100 * r['share']:>7.1f}%{r['calls_per_step']:>7.0f}")
    print(f"total {total / 1e3 / args.steps:.1f} ms/step ({'device' if cuda else 'CPU'} time)")
    print("  ".join(f"{k} {v:.1f} ms ({100 * v / (total / 1e3 / args.steps):.0f}%)"
                    for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    tag = args.preset + ("-fp8" + ("-experts" if args.fp8_experts else "") if args.precision == "fp8" else "")
    save(__file__, args, {"rows": rows, "classes_ms_per_step": classes, "total_ms_per_step": total / 1e3 / args.steps},
         tag=tag)


if __name__ == "__main__":
    main()
