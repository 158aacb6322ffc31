"""The one writer of benchmark results. Every script saves through `save`, so every file has the same top-level keys
and a name that says what ran, on what, and when:

    benchmarks/results/<area>/<name>_<device>_<YYYY-MM-DD>.json    a second run of the day: ..._<date>-2.json, -3 ...
    docs/img/<area>/<the same stem>.png                             the run's figure, if it has one

Schema "dsv3-bench/1", exactly these top-level keys: schema, script (the script's path in the repository), date
(ISO 8601, when it was saved), device (the GPU's name from torch, or "cpu: MODEL, N cores"), torch (version),
git_sha (the checkout's commit, or "unknown"), args (the script's arguments), results (its numbers, any shape) and,
optionally, notes (a string). tests/test_benchmark_results.py checks every file in benchmarks/results/ against it.

Environment:
  DSV3_BENCH_OUT=DIR   results go to DIR/<area>/ and figures to DIR/img/<area>/ (smoke runs and tests leave the
                       repository alone)
  DSV3_GIT_SHA=SHA     the commit, where the tree is a copy without .git (as on a lent GPU machine)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import torch

SCHEMA = "dsv3-bench/1"
KEYS = ("schema", "script", "date", "device", "torch", "git_sha", "args", "results")  # and, optionally, "notes"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # where kept runs live (scripts that read earlier runs read them here)
IMAGES = REPO / "docs" / "img"
# <name>_<device>_<date>[-N].json: the device slug has no "_", so the last two "_" split the three parts
FILE_NAME = re.compile(r"(?P<name>[a-z0-9][a-z0-9_.-]*)_(?P<device>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})"
                       r"(?:-(?P<n>[2-9]|[1-9][0-9]+))?\.json")


def device_name(device: str = "cuda") -> str:
    """The GPU torch sees (for a run on `device` "cuda"), else "cpu: MODEL, N cores" (the cores this process may
    use)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown model"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model}, {cores} cores"


def device_slug(device: str) -> str:
    """The device part of a file name: "NVIDIA H100 80GB HBM3" -> h100, "2 x NVIDIA H200" -> 2xh200, cpu -> cpu."""
    m = re.fullmatch(r"(\d+) x (.*)", device)
    count, device = (m.group(1) + "x", m.group(2)) if m else ("", device)
    if device.lower().startswith("cpu"):
        return count + "cpu"
    words = [w for w in re.findall(r"[a-z0-9]+", device.lower())
             if w not in ("nvidia", "amd", "intel", "geforce", "tesla", "instinct")]
    return count + next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")


def git_sha() -> str:
    """DSV3_GIT_SHA if set, else the checkout's HEAD, else "unknown" (a copy of the tree without .git)."""
    if os.environ.get("DSV3_GIT_SHA"):
        return os.environ["DSV3_GIT_SHA"]
    if (REPO / ".git").exists():  # a worktree's .git is a file
        try:
            r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _roots() -> tuple[Path, Path]:
    out = os.environ.get("DSV3_BENCH_OUT")
    return (Path(out), Path(out) / "img") if out else (RESULTS, IMAGES)


def _write(path: Path, fill) -> None:
    """`fill(tmp_path)` writes a temporary file beside `path`, which then replaces `path` in one step: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _claim(directory: Path, stem: str, text: str) -> Path:
    """Write `text` to the first free <stem>.json, <stem>-2.json, ...; the hard link fails where a file exists,
    so two runs saving at once cannot take the same name."""
    tmp = directory / f".{stem}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for n in itertools.count(1):
            path = directory / f"{stem}{'' if n == 1 else f'-{n}'}.json"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)


def record(script: str, args, results, *, device: str | None = None, notes: str | None = None) -> dict:
    """The JSON object `save` writes."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    path = Path(script).resolve()
    rec = {"schema": SCHEMA, "script": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name,
           "date": datetime.now().astimezone().isoformat(timespec="seconds"), "device": device or device_name(),
           "torch": torch.__version__, "git_sha": git_sha(), "args": dict(args or {}), "results": results}
    if notes:
        rec["notes"] = notes
    return rec


def save(script: str, args, results, *, tag: str = "", device: str | None = None, notes: str | None = None,
         figure=None, update: Path | None = None) -> Path:
    """Write one run's results; returns the JSON file's path.

    script: the caller's `__file__`: its folder names the area, its stem the result (`tag` appended after "-",
    e.g. decode-bench-684m). device: what ran it, when not this process's device (e.g. "8 x NVIDIA H100 ...").
    figure: a matplotlib Figure or a PNG file, saved as <images>/<area>/<the JSON's stem>.png.
    update: a path an earlier `save` of this run returned: rewritten in place (a script that saves after every
    model keeps what it measured if a later one fails)."""
    rec = record(script, args, results, device=device, notes=notes)
    text = json.dumps(rec, indent=1, default=str) + "\n"  # default=str: Paths and dtypes in args
    results_root, images_root = _roots()
    area = Path(script).resolve().parent.name
    if update is not None:
        path = Path(update)
        rec["date"] = json.loads(path.read_text())["date"]  # the run's start, as its file name says
        text = json.dumps(rec, indent=1, default=str) + "\n"
        _write(path, lambda tmp: tmp.write_text(text))
    else:
        name = re.sub(r"[^a-z0-9_.-]+", "-", (Path(script).stem + (f"-{tag}" if tag else "")).lower()).strip("-")
        (results_root / area).mkdir(parents=True, exist_ok=True)
        path = _claim(results_root / area, f"{name}_{device_slug(rec['device'])}_{rec['date'][:10]}", text)
    if figure is not None:
        png = images_root / area / f"{path.stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(figure, (str, Path)):
            _write(png, lambda tmp: shutil.copyfile(figure, tmp))
        else:
            _write(png, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    print(f"wrote {path}" + (f" and {png}" if figure is not None else ""))
    return path


def load(path: Path) -> dict:
    """One results file (a path relative to benchmarks/results/, or any path)."""
    path = Path(path)
    return json.loads((path if path.is_absolute() or path.exists() else RESULTS / path).read_text())
