"""`dsv3 sft`: supervised fine-tuning on chat data, loss on the assistant's tokens only
(docs/post-training.md#sft).

Data: JSONL, one example per line, either `{"messages": [...]}` (OpenAI / DeepSeek message dicts, tool calls
and `<think>` reasoning included) or `{"prompt": ..., "completion": "..."}` (the prompt a string, or messages
rendered with the generation prompt); or Parquet with a `messages` column (lists of {role, content, ...}
structs) or `prompt` and `completion` columns, each row one example. A struct field a message lacks reads as
None, which the chat template treats as absent (Tokenizer.apply_chat_template drops None-valued keys).

Design notes
- Rendering: each assistant turn's tokens are exactly what the chat template writes for it, found by rendering
  the conversation up to and including that turn and taking the text past the render that stops at its
  generation prompt. Context and turns are tokenized separately, as at inference, where the prompt is encoded
  alone and the model writes the rest. The template drops past turns' reasoning (as R1 does), so only the last
  assistant turn trains with its `<think>…</think>`; earlier turns train on what later prompts show of them.
- The loss covers every assistant token including the turn's end-of-sentence token, and nothing else, averaged
  over all such tokens of the optimizer step (gradient accumulation included).
- Packing: examples are packed back to back into rows of `seq_len`; `doc_ids` keeps attention inside an example
  and restarts positions, so packing leaks nothing across examples. Overlong examples are cut at `seq_len`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3 import options
from dsv3.data import arrow
from dsv3.data.loader import Batch
from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.model import Transformer
from dsv3.options import add_flags, flat_init, option, piece, positive, to_json
from dsv3.rl.policy import load_policy
from dsv3.tokenizer import THINK, THINK_END, Tokenizer
from dsv3.train.checkpoint import save_checkpoint
from dsv3.train.config import OptimConfig, RuntimeConfig
from dsv3.train.metrics import MetricsLog
from dsv3.train.objective import update_balance_bias
from dsv3.train.optim import build_optimizer, lr_at

IGNORE = -100


SFT_OPTIM = dict(lr=5e-5, warmup=10)  # R1: cosine 5e-5 -> 5e-6 (min_lr_ratio 0.1); rft fine-tunes with these too


@flat_init
@dataclass(slots=True)
class SFTConfig:
    init_from: str = option("", required=True, help="checkpoint directory to fine-tune (Hugging Face layout + "
                                                    "tokenizer)")
    data: list[str] = option(default_factory=list, nargs="+", required=True,
                             help="JSONL files of {'messages': [...]} or {'prompt', 'completion'}, or Parquet "
                                  "files with those columns")
    epochs: float = option(2.0, help="passes over the data (R1: 2)")
    steps: int = option(0, unset="from --epochs", help="optimizer steps")
    batch_size: int = option(16, help="packed rows of seq-len per optimizer step")
    micro_batch_size: int | None = option(None, unset="the whole batch",
                                          help="rows per forward/backward (gradient accumulation)")
    seq_len: int = option(1024, help="tokens per packed row")
    bias_update_rate: float = option(0.0, unset="biases frozen", help="γ of aux-loss-free bias updates during SFT")
    optim: OptimConfig = piece(OptimConfig, **SFT_OPTIM)
    runtime: RuntimeConfig = piece(RuntimeConfig, out="runs/sft", keep=1)

    def __post_init__(self):
        positive(self, "batch_size", "seq_len")
        if self.epochs <= 0 and self.steps <= 0:
            raise ValueError(f"epochs={self.epochs} and steps={self.steps}: one must be positive")
        mb = self.micro_batch_size or self.batch_size
        if mb <= 0 or self.batch_size % mb:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")


# ---- data -------------------------------------------------------------------------------------------------
def read_examples(paths: list[str]) -> list[dict]:
    examples = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SFT data file not found")
        if path.suffix == ".parquet":
            examples += _parquet_examples(path)
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    if not examples:
        raise ValueError(f"no SFT examples in {', '.join(paths) or '(no files given)'}")
    return examples


def _parquet_examples(path: Path) -> list[dict]:
    # Read whole, as JSONL is: SFT sets are small next to pretraining corpora. Only the example's columns are
    # read (an id or source column is not needed); tokenize_example validates each row as it does a JSONL line.
    names = arrow.columns(path)
    wanted = ["messages"] if "messages" in names else ["prompt", "completion"]
    if not set(wanted) <= set(names):
        raise ValueError(f"{path}: an SFT Parquet file needs a 'messages' column or 'prompt' and 'completion' "
                         f"columns; it has {names}")
    return arrow.read_rows(path, wanted)


def _reasoning(message: dict) -> str:
    """The `<think>…</think>` block of an assistant message (in its content, or as `reasoning_content`)."""
    if message.get("reasoning_content"):
        return f"{THINK}{message['reasoning_content']}{THINK_END}"
    content = (message.get("content") or "").lstrip()
    return content[:content.index(THINK_END) + len(THINK_END)] if content.startswith(THINK) and \
        THINK_END in content else ""


def tokenize_example(example: dict, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """-> (token ids, train-on-this-token flags). Raises ValueError naming what is wrong with the example."""
    if "messages" in example:
        return _tokenize_messages(example["messages"], tok)
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if not isinstance(completion, str):
            raise ValueError("'completion' must be a string")
        if isinstance(prompt, list):
            ctx = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        elif isinstance(prompt, str):
            ctx = tok.encode(prompt, add_bos=True)
        else:
            raise ValueError("'prompt' must be a string or a list of messages")
        target = tok.encode(completion, add_special_tokens=False) + [tok.eos_id]
        return ctx + target, [False] * len(ctx) + [True] * len(target)
    raise ValueError(f"an SFT example needs 'messages' or 'prompt' + 'completion'; got keys {sorted(example)}")


def _tokenize_messages(messages: list[dict], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns:
        raise ValueError("the example has no assistant message to train on")
    if turns[0] == 0:
        raise ValueError("the first message is the assistant's: there is no prompt before it")
    ids, train, consumed = [], [], ""
    for i in turns:
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not before.startswith(consumed) or not full.startswith(before):
            raise ValueError(f"the chat template does not render message {i} as a continuation of the ones "
                             "before it, so its tokens cannot be separated from the prompt")
        turn = full[len(before):]
        think = _reasoning(messages[i])
        if i == turns[-1] and think and not turn.startswith(think):
            turn = think + turn  # the last turn keeps the reasoning that the template drops from history
        ctx = tok.encode(before[len(consumed):], add_special_tokens=False)
        target = tok.encode(turn, add_special_tokens=False)
        ids += ctx + target
        train += [False] * len(ctx) + [True] * len(target)
        consumed = full
    return ids, train


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> list[Batch]:
    """Greedy packing in the given order -> one-row Batches (labels IGNORE outside the assistant's tokens)."""
    rows, cur = [], []

    def flush():
        ids, labels, docs = [], [], []
        for d, (x, t) in enumerate(cur):
            ids += x
            labels += [x[j + 1] if t[j + 1] else IGNORE for j in range(len(x) - 1)] + [IGNORE]
            docs += [d] * len(x)
        pad = seq_len - len(ids)
        rows.append(Batch(torch.tensor([ids + [pad_id] * pad]), torch.tensor([labels + [IGNORE] * pad]),
                          torch.tensor([docs + [len(cur)] * pad])))
        cur.clear()

    for x, t in examples:
        x, t = x[:seq_len], t[:seq_len]
        if cur and sum(len(c[0]) for c in cur) + len(x) > seq_len:
            flush()
        cur.append((x, t))
    if cur:
        flush()
    return rows


def cat(rows: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(r, f) for r in rows]) for f in ("input_ids", "labels", "doc_ids")))


# ---- model ------------------------------------------------------------------------------------------------
def token_nll(model: Transformer, batch: Batch, autocast: bool):
    """-> (summed NLL of the labelled tokens of a packed batch, the model's output)."""
    with torch.autocast(batch.input_ids.device.type, torch.bfloat16, enabled=autocast):
        out = model(batch.input_ids, doc_ids=batch.doc_ids)
    return cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten()).sum(), out


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, examples: list[dict] | None = None):
        self.model, self.tok, self.device = load_policy(cfg.init_from, cfg.runtime)
        self.autocast = cfg.runtime.use_autocast(self.device)
        examples = examples if examples is not None else read_examples(cfg.data)
        tokenized = []
        for n, ex in enumerate(examples):
            try:
                tokenized.append(tokenize_example(ex, self.tok))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"SFT example {n}: {e}") from None
        self.truncated = sum(len(x) > cfg.seq_len for x, _ in tokenized)
        rng, self.rows, epochs = random.Random(cfg.runtime.seed), [], 0
        while True:  # a new order (and packing) every epoch, as many epochs as the steps need
            rng.shuffle(tokenized)
            self.rows += pack(tokenized, cfg.seq_len, self.tok.eos_id)
            epochs += 1
            if (len(self.rows) >= cfg.steps * cfg.batch_size) if cfg.steps else epochs >= math.ceil(cfg.epochs):
                break
        steps = cfg.steps or max(1, int(len(self.rows) / epochs * cfg.epochs) // cfg.batch_size)
        self.cfg = dataclasses.replace(cfg, steps=steps)
        self.n_examples = len(examples)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.run_dir = Path(cfg.runtime.out)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = lr_at(step, cfg.optim, cfg.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        start = step * cfg.batch_size % len(self.rows)
        rows = [self.rows[(start + i) % len(self.rows)] for i in range(cfg.batch_size)]
        n_tokens = sum(int((r.labels != IGNORE).sum()) for r in rows)
        mb, total, counts = cfg.micro_batch_size or cfg.batch_size, 0.0, None
        for i in range(0, len(rows), mb):
            nll, out = token_nll(self.model, cat(rows[i:i + mb]).to(self.device), self.autocast)
            (nll / max(n_tokens, 1)).backward()
            total += float(nll.detach())
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.bias_update_rate and counts is not None and self.model.config.topk_method == "noaux_tc":
            update_balance_bias(self.model, counts, cfg.bias_update_rate)
        return {"step": step + 1, "loss": total / max(n_tokens, 1), "lr": lr, "grad_norm": float(grad_norm),
                "assistant_tokens": n_tokens}

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(to_json(cfg))
        print(f"SFT: {self.n_examples} examples in {len(self.rows)} packed rows of {cfg.seq_len} tokens "
              f"({self.truncated} cut at seq_len), {cfg.steps} steps of {cfg.batch_size} rows on {self.device}")
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        bar = tqdm(range(cfg.steps), unit="step", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            rec = self.train_step(step)
            rec["tokens_per_s"] = cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:,.0f}",
                            refresh=False)
        log.close()
        tok_dir = self.run_dir / "tokenizer"
        self.tok.save(tok_dir)
        ckpt = save_checkpoint(self.run_dir, cfg.steps, self.model, self.opt, {"sft_config": dataclasses.asdict(cfg)},
                               cfg.runtime.keep, tok_dir)
        return {"steps": cfg.steps, "loss": rec["loss"], "checkpoint": str(ckpt / "model")}


def add_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, SFTConfig)


def from_args(args: argparse.Namespace) -> SFTConfig:
    return options.from_args(SFTConfig, args)
