"""What a training run shows: metrics.jsonl (one object per step), and `dsv3 plot RUN_DIR` -> plot.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s of the GPUs whose MFU we report, from NVIDIA's datasheets, by
# a part of torch.cuda.get_device_name(): the first match wins, so the PCIe and NVL variants precede the SXM name.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of `device` for MFU; None on a CPU or a GPU missing from the table (then no MFU is
    logged, rather than one against another GPU's peak)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for part, flops in PEAK_BF16_FLOPS if part in name), None)


class MetricsLog:
    """JSONL, flushed per line. A run from the start replaces an earlier run's file in the same directory; on
    resume, lines past the checkpoint's step are dropped first so the resumed run's lines replace them instead of
    duplicating them."""

    def __init__(self, path: Path | None, resume_step: int | None = None):
        self.file = None  # path None: a log that writes nothing (ranks other than 0)
        if path is None:
            return
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a" if resume_step is not None else "w")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def start_profile(device):
    """torch.profiler over the next steps: GPU kernels on CUDA, operators on a CPU."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU])
    prof.start()
    return prof


def time_breakdown(prof, steps: int, wall_s: float, cuda: bool) -> dict:
    """Stop the profiler -> milliseconds per step: wall clock, compute kernels, NCCL send/recv kernels (expert
    parallelism's all-to-all, the pipeline's stage-to-stage sends) and NCCL collectives (FSDP's all-gather and
    reduce-scatter, all-reduce); busy = compute / wall, so 1 − busy is the time this GPU waited (launch gaps,
    exposed communication, pipeline bubbles). On a CPU the same from operator self-times (approximate: gloo
    works in threads of its own)."""
    prof.stop()
    ms = {"compute_ms": 0.0, "nccl_sendrecv_ms": 0.0, "nccl_collective_ms": 0.0}
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
        name = e.key.lower()
        if any(k in name for k in ("sendrecv", "alltoall", "all_to_all", "c10d::send", "c10d::recv")):
            ms["nccl_sendrecv_ms"] += t
        elif any(k in name for k in ("nccl", "c10d::", "gloo")):
            ms["nccl_collective_ms"] += t
        else:
            ms["compute_ms"] += t
    step_ms = wall_s * 1e3 / steps
    return {"step_ms": step_ms, **ms, "busy": ms["compute_ms"] / step_ms}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a dsv3 run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Loss (train, validation, MTP), learning rate, and expert-load MaxVio against steps, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=0.8)
    if any("mtp_loss" in r for r in train):
        ax.plot([r["step"] for r in train if "mtp_loss" in r], [r["mtp_loss"] for r in train if "mtp_loss" in r],
                label="MTP (depth 1)", lw=0.8, alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    if val and "unigram_loss" in val[-1]:
        ax.axhline(val[-1]["unigram_loss"], ls="--", c="gray", label="unigram baseline")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    vio = [r for r in train if r.get("maxvio")]
    if vio:
        axes[2].plot([r["step"] for r in vio], [sum(r["maxvio"]) / len(r["maxvio"]) for r in vio], label="mean")
        axes[2].plot([r["step"] for r in vio], [max(r["maxvio"]) for r in vio], label="worst layer", alpha=0.7)
        axes[2].legend()
    axes[2].set(xlabel="step", ylabel="MaxVio = max load / mean load − 1", title="expert load balance")
    return save_figure(fig, run_dir, out)


def save_figure(fig, run_dir: Path, out: Path | None) -> Path:
    """Title the figure with the run, write it (default RUN_DIR/plot.png) and free it."""
    import matplotlib.pyplot as plt
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "plot.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
