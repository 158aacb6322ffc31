"""The GRPO demo as a measurement: pretrain-or-load → SFT warm start → GRPO, held-out greedy accuracy before and
after, the eval curve, minutes per phase, and the reward plot as the run's figure.

    python -m benchmarks.rl.grpo_demo                                      # the CPU demo's defaults
    python -m benchmarks.rl.grpo_demo --device cuda --preset bench-684m --task chain:2-4 --pretrain-lr 1e-3 \
        --sft-steps 200 --sft-lr 3e-4 --grpo-lr 2e-6 --prompts-per-step 32 --tag 684m-chain   # one GPU
Results: docs/post-training.md#demo; saved as benchmarks/results/rl/grpo_demo[-<tag>]_<device>_<date>.json, the plot
in docs/img/rl/.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.results import device_name, save
from dsv3.rl.demo import DemoConfig, demo
from dsv3.train.metrics import read_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    for name, f in fields.items():
        default = f.default
        kind = type(default) if default is not None and not isinstance(default, bool) else str
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"(default {default})")
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args()
    cfg = DemoConfig(**{k: getattr(args, k) for k in fields})
    t0 = time.perf_counter()
    result = demo(cfg)
    evals = [r for r in read_metrics(Path(cfg.out) / "grpo") if "eval_accuracy" in r]
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{'step':>6} {'held-out accuracy':>18}")
    for r in evals:
        print(f"{r['step']:>6} {r['eval_accuracy']:>18.3f}")
    print(f"total {minutes:.1f} min")
    save(__file__, args, {"result": result, "eval_curve": evals, "minutes_total": minutes,
                          "threads": torch.get_num_threads()},
         tag=args.tag, device=device_name(cfg.device), figure=result["reward_plot"])


if __name__ == "__main__":
    main()
