"""`dsv3 grpo --demo`: pretrain-or-load `tiny` → SFT on the task's answer format → GRPO, on a laptop CPU.

Prints held-out greedy accuracy of the SFT model and of the GRPO model on the same problems; the last line of
output is one JSON object (`accuracy_before`, `accuracy_after`, `n_heldout`, ...). The reward curve is
OUT/grpo/plot.png.

The warm start teaches the answer format two ways: most solutions answer at once after an empty reasoning
block, the rest work the sum line by line (R1's cold start is small, too). Which way earns the reward is left
for RL to find. With only worked solutions, this budget moved greedy accuracy by noise
(docs/post-training.md#demo).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from dsv3.rl.grpo import GRPOConfig, GRPOTrainer
from dsv3.rl.sft import SFTConfig, SFTTrainer
from dsv3.rl.tasks import get_task
from dsv3.train.checkpoint import checkpoints
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer


@dataclass(slots=True)
class DemoConfig:
    out: str = "runs/grpo-demo"
    init_from: str | None = None  # a base checkpoint; None: the quickstart's if finished, else pretrain one
    task: str = "chain:2-4"
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    sft_steps: int = 400  # a warm start on the answer format (16 packed rows of 256 tokens per step)
    sft_examples: int = 5000  # repeated over epochs as the steps need
    direct_fraction: float = 0.7  # warm-start solutions that answer at once, with an empty reasoning block
    sft_lr: float = 2e-3
    grpo_steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 1.5e-5
    temperature: float = 1.0
    max_tokens: int = 64
    n_heldout: int = 200
    seed: int = 0
    device: str = "cpu"
    preset: str = "tiny"  # the model pretrained when there is no base checkpoint
    sft_batch_size: int = 16
    threads: int | None = None


def base_checkpoint(cfg: DemoConfig) -> str:
    if cfg.init_from:
        return cfg.init_from
    runs = [Path(cfg.out) / "pretrain"] + ([Path("runs/quickstart")] if cfg.preset == "tiny" else [])
    for run in runs:
        done = checkpoints(run)
        if done:
            print(f"base model: {done[-1] / 'model'}")
            return str(done[-1] / "model")
    print(f"no base model: pretraining {cfg.preset} for {cfg.pretrain_steps} steps on the shipped corpus")
    summary = Trainer(TrainConfig(preset=cfg.preset, device=cfg.device, out=str(Path(cfg.out) / "pretrain"),
                                  steps=cfg.pretrain_steps, batch_size=8, seq_len=256, lr=cfg.pretrain_lr, warmup=30,
                                  mtp=False, eval_every=cfg.pretrain_steps, save_every=cfg.pretrain_steps,
                                  threads=cfg.threads, seed=cfg.seed)).run()
    return summary["checkpoint"]


def demo(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    base = base_checkpoint(cfg)
    t_base = time.perf_counter()
    rng = random.Random(cfg.seed)
    examples = [{"messages": p.messages() + [{"role": "assistant",
                                              "content": task.solution(p, rng.random() >= cfg.direct_fraction)}]}
                for p in task.problems(cfg.sft_examples, cfg.seed)]
    sft = SFTTrainer(SFTConfig(init_from=base, out=str(Path(cfg.out) / "sft"), steps=cfg.sft_steps,
                               batch_size=cfg.sft_batch_size, seq_len=256, lr=cfg.sft_lr, warmup=10, seed=cfg.seed,
                               threads=cfg.threads, device=cfg.device), examples).run()
    t_sft = time.perf_counter()
    grpo = GRPOTrainer(GRPOConfig(init_from=sft["checkpoint"], task=cfg.task, out=str(Path(cfg.out) / "grpo"),
                                  steps=cfg.grpo_steps, prompts_per_step=cfg.prompts_per_step,
                                  group_size=cfg.group_size, max_tokens=cfg.max_tokens, lr=cfg.grpo_lr,
                                  temperature=cfg.temperature,
                                  eval_every=max(1, cfg.grpo_steps // 4), eval_n=cfg.n_heldout, seed=cfg.seed,
                                  threads=cfg.threads, device=cfg.device)).run()
    t_end = time.perf_counter()
    minutes = {"base": t_base - t0, "sft": t_sft - t_base, "grpo": t_end - t_sft}
    result = {"task": task.name, "accuracy_before": grpo["accuracy_before"], "accuracy_after": grpo["accuracy_after"],
              "n_heldout": grpo["n_heldout"], "sft_checkpoint": sft["checkpoint"],
              "grpo_checkpoint": grpo["checkpoint"], "reward_plot": grpo["plot"],
              "minutes": {k: round(v / 60, 2) for k, v in minutes.items()}}
    print(f"\nheld-out greedy accuracy on {result['n_heldout']} {task.name} problems: SFT "
          f"{result['accuracy_before']:.3f} -> GRPO {result['accuracy_after']:.3f}")
    print(json.dumps(result))
    return result
