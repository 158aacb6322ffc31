"""`dsv3 eval CKPT`: task accuracy (greedy, or pass@k by sampling) through the inference engine, and perplexity
on a text file. One JSON object out; GRPO's periodic evaluation and the demo call the same functions."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3.infer.engine import Engine
from dsv3.infer.llm import LLM, LoadConfig, run_requests
from dsv3.infer.sampler import SamplingParams
from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.options import add_flags, flat_init, option, piece
from dsv3.rl.tasks import Problem, Task, final_answer, get_task, task_option, well_formed


def task_accuracy(engine: Engine, task: Task, problems: list[Problem], k: int = 1, temperature: float = 0.0,
                  max_tokens: int = 256, seed: int = 0, use_tqdm: bool = False) -> dict:
    """Greedy (temperature 0, k = 1): accuracy of one answer per problem. Sampling: k answers per problem;
    `pass@k` = share of problems with a correct one, `accuracy` = share of correct answers (pass@1)."""
    if k > 1 and temperature == 0:
        raise ValueError(f"pass@{k} needs sampling: give a temperature > 0")
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(p.messages(), tokenize=True) for p in problems]
    params = [SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(problems))]
    outs = run_requests(engine, prompts, params, use_tqdm, desc=f"eval {task.name}")
    correct, formatted, lengths, solved = 0, 0, [], 0
    for p, out in zip(problems, outs):
        hits = 0
        for c in out.outputs:
            answer = final_answer(c.text)
            hits += answer is not None and task.score(answer, p) == 1.0
            formatted += well_formed(c.text)
            lengths.append(len(c.token_ids))
        correct += hits
        solved += hits > 0
    n = len(problems) * k
    result = {"task": task.name, "n": len(problems), "k": k, "temperature": temperature,
              "accuracy": correct / n, "format_rate": formatted / n, "mean_length": sum(lengths) / n}
    if k > 1:
        result[f"pass@{k}"] = solved / len(problems)
    return result


@torch.no_grad()
def perplexity(engine: Engine, path: str, seq_len: int) -> dict:
    """Mean next-token NLL over the file cut into windows of seq_len + 1 tokens (each token a label once)."""
    text = Path(path).read_text(encoding="utf-8")
    ids = torch.tensor(engine.tokenizer.encode(text, add_bos=True))
    if len(ids) < 2:
        raise ValueError(f"{path}: too little text for a perplexity")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start:start + seq_len + 1].to(engine.device)
        logits = engine.model(window[None, :-1]).logits[0]
        total += float(cross_entropy(logits.float(), window[1:]).sum())
        count += len(window) - 1
    return {"text": str(path), "tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}


@flat_init
@dataclass(slots=True)
class EvalConfig:
    checkpoint: str = option("", positional=True, help="checkpoint directory (Hugging Face layout with tokenizer "
                                                       "files)")
    task: str | None = task_option(None)
    n: int = option(200, help="held-out problems")
    k: int = option(1, help="samples per problem; > 1 reports pass@k (needs --temperature > 0)")
    temperature: float = option(0.0, unset="greedy", help="sampling temperature")
    max_tokens: int = option(256, help="longest answer (tokens)")
    seed: int = option(0, help="seed of the problems and of sampling")
    text: str | None = option(None, unset="none", help="a text file to report perplexity on")
    seq_len: int = option(512, help="perplexity window (tokens)")
    out: str | None = option(None, unset="stdout only", help="also write the JSON here")
    load: LoadConfig = piece(LoadConfig)


def add_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, EvalConfig)


def run(cfg: EvalConfig) -> dict:
    if not cfg.task and not cfg.text:
        raise ValueError("give --task (accuracy) and/or --text (perplexity)")
    engine = LLM.from_config(cfg.checkpoint, cfg.load).engine
    result = {"checkpoint": cfg.checkpoint}
    if cfg.task:
        task = get_task(cfg.task)
        result["task"] = task_accuracy(engine, task, task.problems(cfg.n, cfg.seed, "test"), cfg.k,
                                       cfg.temperature, cfg.max_tokens, cfg.seed, use_tqdm=True)
    if cfg.text:
        result["perplexity"] = perplexity(engine, cfg.text, cfg.seq_len)
    line = json.dumps(result)
    if cfg.out:
        Path(cfg.out).write_text(line + "\n")
    print(line)
    return result
