"""The GRPO demo as a measurement: pretrain-or-load → SFT warm start → GRPO, held-out greedy accuracy before and
after, the eval curve, time per phase, and the reward plot copied next to the JSON.

    python benchmarks/bench_grpo_demo.py                                   # the CPU demo's defaults (2 cores)
    python benchmarks/bench_grpo_demo.py --device cuda --preset bench-684m --task arithmetic --sft-steps 300 \
        --grpo-steps 200 --grpo-lr 1e-5 --tag h100                         # a larger model on one GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from dsv3.rl.demo import DemoConfig, demo
from dsv3.train.metrics import read_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    for name, f in fields.items():
        default = f.default
        kind = type(default) if default is not None and not isinstance(default, bool) else str
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"(default {default})")
    p.add_argument("--tag", default="cpu", help="name of the result files (default cpu)")
    args = p.parse_args()
    cfg = DemoConfig(**{k: getattr(args, k) for k in fields})
    t0 = time.perf_counter()
    result = demo(cfg)
    evals = [r for r in read_metrics(Path(cfg.out) / "grpo") if "eval_accuracy" in r]
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    shutil.copyfile(result["reward_plot"], out / f"grpo_demo_{args.tag}.png")
    record = {"config": dataclasses.asdict(cfg), "result": result, "eval_curve": evals,
              "minutes_total": (time.perf_counter() - t0) / 60, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor(),
              "threads": torch.get_num_threads()}
    (out / f"grpo_demo_{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'step':>6} {'held-out accuracy':>18}")
    for r in evals:
        print(f"{r['step']:>6} {r['eval_accuracy']:>18.3f}")
    print(f"total {record['minutes_total']:.1f} min; wrote {out / f'grpo_demo_{args.tag}.json'}")


if __name__ == "__main__":
    main()
