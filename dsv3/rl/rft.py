"""`dsv3 rft`: rejection-sampling fine-tuning (R1 report §2.3.3, docs/post-training.md#rejection-sampling).
Sample k completions per prompt from the model, keep the ones the verifier marks correct and that pass the
format filter (one copy of each distinct completion), write them as SFT data (OUT/rft.jsonl), and fine-tune the
same model on them."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dsv3.infer.engine import Engine
from dsv3.infer.llm import LLM, run_requests
from dsv3.infer.sampler import SamplingParams
from dsv3.options import add_flags, flat_init, option, piece
from dsv3.rl.sft import SFT_OPTIM, SFTConfig, SFTTrainer
from dsv3.rl.tasks import Problem, Task, final_answer, get_task, task_option, well_formed
from dsv3.train.config import OptimConfig, RuntimeConfig


def rejection_sample(engine: Engine, task: Task, problems: list[Problem], k: int, temperature: float,
                     max_tokens: int, seed: int = 0) -> list[dict]:
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(p.messages(), tokenize=True) for p in problems]
    params = [SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(problems))]
    kept = []
    for p, out in zip(problems, run_requests(engine, prompts, params, desc="rejection sampling")):
        good = {c.text.strip() for c in out.outputs if c.finish_reason == "stop" and well_formed(c.text)
                and task.score(final_answer(c.text), p) == 1.0}
        kept += [{"messages": p.messages() + [{"role": "assistant", "content": text}]} for text in sorted(good)]
    return kept


@flat_init
@dataclass(slots=True)
class RFTConfig:
    checkpoint: str = option("", positional=True,
                             help="the model to sample from and fine-tune (Hugging Face layout + tokenizer)")
    task: str = task_option("arithmetic")
    n: int = option(1000, help="training prompts to sample")
    k: int = option(8, help="samples per prompt")
    temperature: float = option(1.0, help="sampling temperature")
    max_tokens: int = option(256, help="longest completion (tokens)")
    epochs: float = option(2.0, help="SFT passes over the kept samples")
    seq_len: int = option(1024, help="SFT packed row length (tokens)")
    optim: OptimConfig = piece(OptimConfig, **SFT_OPTIM)  # of the SFT on the kept samples
    runtime: RuntimeConfig = piece(RuntimeConfig, out="runs/rft", keep=1)


def add_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, RFTConfig)


def run(cfg: RFTConfig) -> dict:
    task, seed = get_task(cfg.task), cfg.runtime.seed
    engine = LLM(cfg.checkpoint, device=cfg.runtime.device).engine
    kept = rejection_sample(engine, task, task.problems(cfg.n, seed), cfg.k, cfg.temperature, cfg.max_tokens, seed)
    if not kept:
        raise ValueError(f"no correct, well-formed completion among {cfg.n}×{cfg.k} samples: nothing to train on")
    out = Path(cfg.runtime.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rft.jsonl.{os.getpid()}"
    tmp.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in kept), encoding="utf-8")
    os.replace(tmp, out / "rft.jsonl")
    print(f"kept {len(kept)} correct completions of {cfg.n}×{cfg.k} samples -> {out / 'rft.jsonl'}")
    del engine
    summary = SFTTrainer(SFTConfig(init_from=cfg.checkpoint, data=[str(out / "rft.jsonl")], epochs=cfg.epochs,
                                   seq_len=cfg.seq_len, optim=cfg.optim, runtime=cfg.runtime)).run()
    result = {"kept": len(kept), "sampled": cfg.n * cfg.k, **summary}
    print(json.dumps(result))
    return result
