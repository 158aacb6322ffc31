"""`dsv3 sft`: supervised fine-tuning on chat data, loss on the assistant's tokens only (SPEC §15.1).

Data: JSONL, one example per line, either `{"messages": [...]}` (OpenAI / DeepSeek message dicts, tool calls
and `<think>` reasoning included) or `{"prompt": ..., "completion": "..."}` (the prompt a string, or messages
rendered with the generation prompt).

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.data.loader import Batch
from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.model import Transformer
from dsv3.rl.policy import load_policy
from dsv3.tokenizer import THINK, THINK_END, Tokenizer
from dsv3.train.checkpoint import save_checkpoint
from dsv3.train.metrics import MetricsLog
from dsv3.train.objective import update_balance_bias
from dsv3.train.optim import build_optimizer, lr_at

IGNORE = -100


@dataclass(slots=True)
class SFTConfig:
    init_from: str = ""  # checkpoint directory (HF layout with its tokenizer files)
    data: list[str] = field(default_factory=list)  # JSONL files
    out: str = "runs/sft"
    epochs: float = 2.0
    steps: int = 0  # 0: from epochs
    batch_size: int = 16  # packed rows of seq_len per optimizer step
    micro_batch_size: int | None = None
    seq_len: int = 1024
    lr: float = 5e-5  # R1: cosine 5e-5 -> 5e-6
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bias_update_rate: float = 0.0  # aux-loss-free bias updates during SFT (0: biases frozen)
    seed: int = 0
    device: str = "auto"
    param_dtype: str = "fp32"
    autocast: bool | None = None  # None: bf16 autocast on GPU, fp32 on CPU
    threads: int | None = None
    keep: int = 1

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
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
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    if not examples:
        raise ValueError(f"no SFT examples in {', '.join(paths) or '(no files given)'}")
    return examples


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
        self.model, self.tok, self.device = load_policy(cfg.init_from, cfg.device, cfg.param_dtype, cfg.threads)
        self.autocast = self.device.type == "cuda" if cfg.autocast is None else cfg.autocast
        examples = examples if examples is not None else read_examples(cfg.data)
        tokenized = []
        for n, ex in enumerate(examples):
            try:
                tokenized.append(tokenize_example(ex, self.tok))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"SFT example {n}: {e}") from None
        self.truncated = sum(len(x) > cfg.seq_len for x, _ in tokenized)
        rng, self.rows, epochs = random.Random(cfg.seed), [], 0
        while True:  # a new order (and packing) every epoch, as many epochs as the steps need
            rng.shuffle(tokenized)
            self.rows += pack(tokenized, cfg.seq_len, self.tok.eos_id)
            epochs += 1
            if (len(self.rows) >= cfg.steps * cfg.batch_size) if cfg.steps else epochs >= math.ceil(cfg.epochs):
                break
        steps = cfg.steps or max(1, int(len(self.rows) / epochs * cfg.epochs) // cfg.batch_size)
        self.cfg = dataclasses.replace(cfg, steps=steps)
        self.n_examples = len(examples)
        self.opt = build_optimizer(self.model, self.cfg)
        self.run_dir = Path(cfg.out)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = lr_at(step, cfg)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.bias_update_rate and counts is not None and self.model.config.topk_method == "noaux_tc":
            update_balance_bias(self.model, counts, cfg.bias_update_rate)
        return {"step": step + 1, "loss": total / max(n_tokens, 1), "lr": lr, "grad_norm": float(grad_norm),
                "assistant_tokens": n_tokens}

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
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
                               cfg.keep, tok_dir)
        return {"steps": cfg.steps, "loss": rec["loss"], "checkpoint": str(ckpt / "model")}


def add_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--init-from", required=True, help="checkpoint directory to fine-tune (Hugging Face layout + tokenizer)")
    a("--data", nargs="+", required=True, help="JSONL files of {'messages': [...]} or {'prompt', 'completion'}")
    a("--out", default="runs/sft", help="run directory (default runs/sft)")
    a("--epochs", type=float, default=2.0, help="passes over the data (default 2, as R1)")
    a("--steps", type=int, default=0, help="optimizer steps (default: from --epochs)")
    a("--batch-size", type=int, default=16, help="packed rows per optimizer step (default 16)")
    a("--micro-batch-size", type=int, help="rows per forward/backward (gradient accumulation)")
    a("--seq-len", type=int, default=1024, help="tokens per packed row (default 1024)")
    a("--lr", type=float, default=5e-5, help="peak learning rate, cosine to a tenth of it (default 5e-5)")
    a("--warmup", type=int, default=10, help="warmup steps (default 10)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    a("--bias-update-rate", type=float, default=0.0, help="γ of aux-loss-free bias updates (default 0: frozen)")
    a("--seed", type=int, default=0, help="seed of the data order (default 0)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    a("--param-dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype on GPU (default fp32)")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def from_args(args: argparse.Namespace) -> SFTConfig:
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return SFTConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
