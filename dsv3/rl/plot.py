"""`dsv3 plot` for a GRPO run: reward and held-out accuracy, completion length, entropy / KL, clip ratios."""
from __future__ import annotations

from pathlib import Path

from dsv3.train.metrics import read_metrics, save_figure


def is_rl_run(run_dir: Path) -> bool:
    return any("reward_mean" in r for r in read_metrics(run_dir))


def plot_rl(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    x = [r["step"] for r in steps]

    def curve(ax, key, label=None, **kw):
        pts = [(r["step"], r[key]) for r in steps if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label or key, lw=0.9, **kw)

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    curve(ax, "reward_mean", "reward (weighted sum)")
    for key in sorted({k for r in steps for k in r if k.startswith("reward_")} - {"reward_mean", "reward_std"}):
        curve(ax, key, key.removeprefix("reward_"), alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", c="k",
                label="held-out accuracy (greedy)")
    ax.set(xlabel="step", ylabel="reward / accuracy", title="reward")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    curve(ax, "completion_len_mean", "mean")
    curve(ax, "completion_len_max", "max", alpha=0.6)
    ax2 = ax.twinx()
    ax2.plot(x, [r.get("truncated_frac", 0) for r in steps], c="r", lw=0.6, alpha=0.6)
    ax2.set_ylabel("truncated fraction", color="r")
    ax.set(xlabel="step", ylabel="tokens", title="completion length")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    curve(ax, "entropy")
    curve(ax, "kl", "KL (k3)")
    curve(ax, "frac_zero_std", "groups with equal rewards")
    ax.set(xlabel="step", title="entropy, KL, dead groups")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    curve(ax, "clip_low", "clipped low (ρ < 1−ε, Â < 0)")
    curve(ax, "clip_high", "clipped high (ρ > 1+ε, Â > 0)")
    ax.set(xlabel="step", ylabel="fraction of tokens", title="clip ratios")
    ax.legend(fontsize=8)
    return save_figure(fig, run_dir, out)
