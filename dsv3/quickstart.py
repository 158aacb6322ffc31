"""`dsv3 quickstart`: the main job. Train `tiny` on the shipped Shakespeare corpus on a laptop CPU, report
validation perplexity next to the unigram baseline, write the checkpoint and the loss plot, and let the model
speak. The last line of output is one JSON object, so scripts can check the run.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dsv3.infer.llm import LLM
from dsv3.infer.sampler import SamplingParams
from dsv3.options import add_flags, flat_init, option, piece
from dsv3.train.checkpoint import checkpoints, read_manifest
from dsv3.train.config import RuntimeConfig, TrainConfig
from dsv3.train.loop import Trainer


@flat_init
@dataclass(slots=True)
class QuickstartConfig:
    steps: int = option(960, help="optimizer steps of 8 × 256 tokens")
    runtime: RuntimeConfig = piece(RuntimeConfig, out="runs/quickstart")


def add_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, QuickstartConfig)


def quickstart_config(qs: QuickstartConfig) -> TrainConfig:
    # Sized for minutes on a laptop CPU: 8 × 256 tokens per step (at this budget, twice the updates of 16 × 256
    # beat the larger batch on validation loss after the same tokens), a 4K BPE, aux-loss-free balancing on.
    # NOTE: MTP is off here: it costs more compute per token on this model, which the quickstart's budget spends
    # better on more main-model tokens. `dsv3 train` trains the preset's MTP module by default.
    # (measured: docs/training.md)
    steps = qs.steps
    return TrainConfig(preset="tiny", steps=steps, batch_size=8, seq_len=256, vocab_size=4096, lr=3e-3, warmup=30,
                       mtp=False, eval_every=max(1, steps // 4), eval_batches=32, save_every=steps,
                       runtime=qs.runtime)


def quickstart(qs: QuickstartConfig | None = None) -> dict:
    qs = qs or QuickstartConfig()
    cfg, out, steps = quickstart_config(qs), qs.runtime.out, qs.steps
    done = checkpoints(Path(out))
    if done and read_manifest(done[-1])["step"] >= steps:
        print(f"{out} already holds a finished quickstart run; reporting it (delete the folder to train again)")
        manifest = read_manifest(done[-1])
        summary = {"val_loss": manifest["eval"]["val_loss"], "unigram_loss": manifest["eval"]["unigram_loss"],
                   "checkpoint": str(done[-1] / "model"), "plot": str(Path(out) / "plot.png")}
    else:
        if done:
            cfg.resume = True
        summary = Trainer(cfg).run()
    ckpt = Path(summary["checkpoint"])
    val, uni = summary["val_loss"], summary["unigram_loss"]
    print(f"\nvalidation loss {val:.3f} nats/token (perplexity {math.exp(val):.1f}) vs. unigram baseline "
          f"{uni:.3f} (perplexity {math.exp(uni):.1f}): {val / uni:.2f}× the unigram loss")
    print(f"checkpoint: {ckpt}\nloss plot:  {summary['plot']}\n")
    print("sample (temperature 0.8, top-k 40):\n" + "-" * 60)
    text = LLM(ckpt, device="cpu").generate("ROMEO.\n", SamplingParams(temperature=0.8, top_k=40, max_tokens=120,
                                                                       seed=0), use_tqdm=False)[0].outputs[0].text
    print("ROMEO.\n" + text)
    print("-" * 60)
    print(f"next: dsv3 generate {ckpt} --prompt 'JULIET.'\n      dsv3 info {ckpt}")
    result = {"val_loss": val, "unigram_loss": uni, "val_over_unigram": val / uni, "checkpoint": str(ckpt),
              "plot": summary["plot"]}
    print(json.dumps(result))
    return result
