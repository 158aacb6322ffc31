"""`dsv3 rft`: rejection-sampling fine-tuning (R1 §2.3.3, SPEC §15.4). Sample k completions per prompt from the
model, keep the ones the verifier marks correct and that pass the format filter (one copy of each distinct
completion), write them as SFT data (OUT/rft.jsonl), and fine-tune the same model on them."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dsv3.infer.engine import Engine
from dsv3.infer.llm import LLM, run_requests
from dsv3.infer.sampler import SamplingParams
from dsv3.rl.sft import SFTConfig, SFTTrainer
from dsv3.rl.tasks import Problem, Task, final_answer, get_task, well_formed


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


def add_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("checkpoint", help="the model to sample from and fine-tune (Hugging Face layout + tokenizer)")
    a("--task", default="arithmetic", help="arithmetic[:MIN-MAX[+-]], countdown[:COUNT] or rg:DATASET")
    a("--n", type=int, default=1000, help="training prompts to sample (default 1000)")
    a("--k", type=int, default=8, help="samples per prompt (default 8)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    a("--max-tokens", type=int, default=256, help="longest completion (tokens; default 256)")
    a("--epochs", type=float, default=2.0, help="SFT passes over the kept samples (default 2)")
    a("--lr", type=float, default=5e-5, help="SFT peak learning rate (default 5e-5)")
    a("--seq-len", type=int, default=1024, help="SFT packed row length (tokens; default 1024)")
    a("--seed", type=int, default=0, help="seed of prompts and sampling (default 0)")
    a("--out", default="runs/rft", help="run directory (default runs/rft)")
    a("--device", help="cpu, cuda, cuda:N (default: cuda if available)")


def run(args: argparse.Namespace) -> dict:
    task = get_task(args.task)
    engine = LLM(args.checkpoint, device=args.device).engine
    kept = rejection_sample(engine, task, task.problems(args.n, args.seed), args.k, args.temperature,
                            args.max_tokens, args.seed)
    if not kept:
        raise ValueError(f"no correct, well-formed completion among {args.n}×{args.k} samples: nothing to train on")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rft.jsonl.{os.getpid()}"
    tmp.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in kept), encoding="utf-8")
    os.replace(tmp, out / "rft.jsonl")
    print(f"kept {len(kept)} correct completions of {args.n}×{args.k} samples -> {out / 'rft.jsonl'}")
    del engine
    summary = SFTTrainer(SFTConfig(init_from=args.checkpoint, data=[str(out / "rft.jsonl")], out=str(out),
                                   epochs=args.epochs, lr=args.lr, seq_len=args.seq_len, seed=args.seed,
                                   device=args.device or "auto")).run()
    result = {"kept": len(kept), "sampled": args.n * args.k, **summary}
    print(json.dumps(result))
    return result
