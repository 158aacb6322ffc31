"""FP8 loss parity: one long `dsv3 train` run per precision on the same data (each its own command, so a lost
machine loses one run), then `--compare` for the smoothed final training loss of each, its relative gap to the
first, and a figure of the curves.

    python -m benchmarks.fp8.parity --mode amp --data TOK/data --tokenizer TOK/tokenizer --model-vocab-size 102400
    python -m benchmarks.fp8.parity --mode amp-fp8 ...        (and both again with --seed 1)
    python -m benchmarks.fp8.parity --compare amp,amp-fp8,amp-earlier --runs-device "NVIDIA H100 80GB HBM3"
A compared run whose directory is not under --runs (made in an earlier machine hold) is read from the newest
results file of this script that holds its curve. The corpus recipe is in docs/benchmarks.md.
Results: docs/fp8.md#fp8-training; saved as benchmarks/results/fp8/parity-<preset>-<mode>_<device>_<date>.json, a
comparison as parity-compare-<preset>-<first run>_..., its figure in docs/img/fp8/.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from benchmarks.fp8.gemm import check_quantize
from benchmarks.fp8.train import add_run_args, train_run
from benchmarks.results import RESULTS, save
from dsv3.train.metrics import read_metrics


def saved_curve(mode: str) -> dict:
    """A run's curve from the newest results file of this script that holds it."""
    for path in sorted((RESULTS / "fp8").glob("parity-*.json"), key=lambda p: json.loads(p.read_text())["date"],
                       reverse=True):
        curves = json.loads(path.read_text())["results"]["curves"]
        if mode in curves:
            return curves[mode]
    raise FileNotFoundError(f"no run directory and no saved curve for {mode!r}")


def curve(runs: Path, mode: str) -> dict:
    if not (runs / mode).is_dir():  # a run made in an earlier machine hold
        return saved_curve(mode)
    rows = [r for r in read_metrics(runs / mode) if "loss" in r and "tokens_per_s" in r]
    return {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:])}


def figure(args, curves: dict, smooth: dict, gaps: dict, last: int) -> Figure:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for m, c in curves.items():
        ema, e = [], c["loss"][0]
        for x in c["loss"]:
            e = 0.98 * e + 0.02 * x
            ema.append(e)
        line, = ax.plot(c["step"], ema, label=f"{m} (final {smooth[m]:.4f}, {c['tokens_per_s']:,.0f} tok/s)")
        ax.plot(c["step"], c["loss"], alpha=0.2, lw=0.5, color=line.get_color())
    text = ", ".join(f"{m} {100 * g:+.2f}%" for m, g in gaps.items())
    ax.set(xlabel="step", ylabel="training loss", ylim=(min(smooth.values()) - 0.3, min(smooth.values()) + 2.5),
           title=f"{args.preset} {args.batch_size}x{args.seq_len}, gap to {next(iter(curves))} "
                 f"(steps {last - args.smooth + 1}-{last}): {text}")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def parity(args) -> tuple[dict, Figure | None]:
    """One long run in one precision; with --compare, the curves of runs already made, and their figure."""
    runs = Path(args.runs)
    name = args.mode + (f"-seed{args.seed}" if args.seed else "")
    if not args.compare:
        train_run(args, args.mode, args.steps, runs / name, warmup=args.warmup, lr=args.lr, seed=args.seed)
    curves = {mode: curve(runs, mode) for mode in (args.compare.split(",") if args.compare else [name])}
    # A run cut short (a lost machine) still compares: at the steps all runs reached, with the same LR schedule.
    last = min(c["step"][-1] for c in curves.values())
    smooth = {m: statistics.fmean([x for s, x in zip(c["step"], c["loss"]) if s <= last][-args.smooth:])
              for m, c in curves.items()}
    out = {"steps": args.steps, "tokens": args.steps * args.batch_size * args.seq_len, "compared_at_step": last,
           "smooth_window": args.smooth, "smoothed_final_loss": smooth, "curves": curves}
    if not args.compare:
        return out, None
    a, *others = args.compare.split(",")  # the first run is the reference; every other one's relative gap to it
    out["relative_gap"] = {m: (smooth[m] - smooth[a]) / smooth[a] for m in others}
    print(f"smoothed loss (mean of steps {last - args.smooth + 1}-{last}): {smooth}; relative gap to {a}: "
          + ", ".join(f"{m} {100 * g:+.2f}%" for m, g in out["relative_gap"].items()))
    return out, figure(args, curves, smooth, out["relative_gap"], last)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--mode", default="amp", help="a mode of benchmarks/fp8/train.py's MODES")
    p.add_argument("--compare", default="", help="REF,RUN,...: compare finished runs (their directories in --runs)")
    p.add_argument("--runs", default="runs/fp8_parity", help="where each run's directory goes")
    p.add_argument("--runs-device", help="--compare: the GPU the runs ran on, for the results file "
                                         "(default: this machine's)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (another seed: run-to-run spread)")
    p.add_argument("--smooth", type=int, default=100, help="final loss = mean of the last N steps' losses")
    args = p.parse_args()
    if not args.compare:
        check_quantize()
    results, fig = parity(args)
    first = args.compare.split(",")[0] if args.compare else args.mode + (f"-seed{args.seed}" if args.seed else "")
    save(__file__, args, results, tag=f"{'compare-' if args.compare else ''}{args.preset}-{first}",
         device=args.runs_device, figure=fig)


if __name__ == "__main__":
    main()
