"""Load balancing as the paper says: aux-loss-free bias updates vs. no balancing vs. the classic auxiliary loss.

Three runs of `dsv3 train` on the same data, seed and schedule, differing only in `--balance`:
  bias  — V3: per-expert bias moved by γ·sign(mean load − load) after every step (+ sequence-wise loss α=1e-4)
  none  — no balancing at all
  aux   — V2-style sequence-wise balance loss with α = 1e-2, no bias
Reported per run: MaxVio (max load / mean load − 1, per MoE layer, averaged over layers) over the last 20% of
steps, the final validation loss, and a figure of MaxVio over training.

  python -m benchmarks.train.balance                                  # tiny on a CPU
  python -m benchmarks.train.balance --preset bench-684m --steps 300 --batch-size 16 --seq-len 2048 \\
      --vocab-size 32000 --lr 1e-3 --data stdlib_shakespeare.jsonl.xz --tag stdlib-shakespeare   # an H100
The larger corpus's recipe is in docs/benchmarks.md.
Results: docs/training.md; saved as benchmarks/results/train/balance-<preset>[-<tag>]_<device>_<date>.json, the figure
in docs/img/train/.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from benchmarks.results import device_name, save
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer
from dsv3.train.metrics import read_metrics

MODES = ("bias", "none", "aux")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (default: batch)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the shipped corpus")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="γ for the bias run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("--data", nargs="*", default=[], help="training text (default: the shipped corpus)")
    p.add_argument("--tag", default="", help="appended to the result file name (e.g. the corpus)")
    return p.parse_args()


def run(args, mode: str, out: Path) -> tuple[dict, str]:
    """One `dsv3 train` run with --balance MODE: its numbers, and the device it ran on."""
    cfg = TrainConfig(preset=args.preset, out=str(out), steps=args.steps, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                      data=args.data,
                      lr=args.lr, warmup=max(1, args.steps // 20), balance=mode, mtp=False,
                      bias_update_rate=args.bias_update_rate, eval_every=args.steps, eval_batches=20,
                      save_every=args.steps, keep=1, threads=args.threads)
    print(f"== balance={mode}")
    trainer = Trainer(cfg)
    summary = trainer.run()
    rows = [r for r in read_metrics(out) if "maxvio" in r]
    tail = rows[int(0.8 * len(rows)):]
    return {
        "val_loss": summary["val_loss"],
        "maxvio_last20pct": sum(sum(r["maxvio"]) / len(r["maxvio"]) for r in tail) / len(tail),
        "maxvio_curve": [[r["step"], sum(r["maxvio"]) / len(r["maxvio"])] for r in rows],
        "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
    }, str(trainer.device)


def figure(args, results: dict) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for mode, r in results.items():
        steps, vio = zip(*r["maxvio_curve"])
        ax.plot(steps, vio, label=f"{mode} (val loss {r['val_loss']:.3f})", lw=0.9)
    ax.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", yscale="log",
           title=f"expert load balance, {args.preset}{' on ' + args.tag if args.tag else ''}")
    ax.legend()
    fig.tight_layout()
    return fig


def main():
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_balance_"))
    results, first = {}, None
    for mode in MODES:
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        if first is not None:  # same BPE and token files as the first run: train and tokenize once
            shutil.copytree(first / "tokenizer", out / "tokenizer")
            shutil.copytree(first / "data", out / "data")
        first = first or out
        results[mode], device = run(args, mode, out)
    print(f"\n{'balance':<8}{'MaxVio (last 20%)':>20}{'val loss':>10}{'tokens/s':>11}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['maxvio_last20pct']:>20.3f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>11,.0f}")
    save(__file__, args, results, tag=args.preset + (f"-{args.tag}" if args.tag else ""),
         device=device_name(device), figure=figure(args, results))


if __name__ == "__main__":
    main()
