"""One-off: convert the results files the docs cite (at commit 8e5db1a) from the old flat layout into the
"dsv3-bench/1" schema of benchmarks/results.py, delete the others with `git rm`, and write the old -> new mapping.

    python -m benchmarks.convert_old_results MAPPING.tsv

Each kept file: its old content becomes `results` (minus "args", "device" and "torch", which become top-level keys);
date and git_sha come from the commit that last changed it; notes name the old file. Run from the repository root
on a checkout of the old layout; deleted again once run (git keeps it).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.results import FILE_NAME, KEYS, SCHEMA, device_slug

OLD = Path("benchmarks/results")
H100, H200, CPU = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "cpu: 2 cores"

# old file -> (new script, tag, device or None = the file's own, extra note); PNGs follow their JSON
KEEP = {
    "bench_fp8_gemm.json": ("benchmarks/fp8/gemm.py", "", None, ""),
    "bench_fp8_train_16b-slice_torchao.json": ("benchmarks/fp8/train.py", "16b-slice", None, ""),
    "bench_fp8_parity_amp_amp-fp8_amp-earlier.json": (
        "benchmarks/fp8/parity.py", "compare-16b-slice-amp", H100,
        "The runs ran on an H100 (amp and amp-fp8 in one machine hold, amp-earlier in an earlier one); the "
        "comparison was computed on a CPU."),
    "bench_fp8_parity_amp-seed1_amp-fp8-seed1_amp-seed1-earlier.json": (
        "benchmarks/fp8/parity.py", "compare-16b-slice-amp-seed1", H100,
        "The runs ran on an H100 (amp-seed1 and amp-fp8-seed1 in one machine hold, amp-seed1-earlier in an earlier "
        "one); the comparison was computed on a CPU."),
    "bench_fp8_parity_tiny-amp_tiny-amp-fp8_tiny-amp-seed1.json": (
        "benchmarks/fp8/parity.py", "compare-tiny-tiny-amp", CPU, "The runs and the comparison ran on this CPU."),
    "bench_serve_bench-684m_h100.json": ("benchmarks/serve/under_load.py", "bench-684m", None, ""),
    "bench_serve_bench-684m_cuda.json": ("benchmarks/serve/under_load.py", "bench-684m", None, ""),
    "bench_serve_cpu.json": ("benchmarks/serve/under_load.py", "tiny-576-vs-vllm", CPU, ""),
    "bench_train_v3-slice_cuda.json": ("benchmarks/train/loop.py", "v3-slice", None, ""),
    "grpo_demo_cpu-demo-session18.json": (
        "benchmarks/rl/grpo_demo.py", "", CPU,
        "args are the DemoConfig the old script recorded as 'config'; the reward plot is the run's figure."),
    "profile_decode_bench-684m_h100_b1.txt": (
        "benchmarks/infer/profile_decode.py", "bench-684m", H100,
        "The old file was the script's printed table; parsed into the shape the script saves (kernel names cut at "
        "90 characters as printed); args from the old file name."),
    "sweep_moe_decode_h100.json": ("benchmarks/infer/sweep_moe_decode.py", "", None, ""),
    "bench_scale_1xcuda_bench-684m_compiled.json": (
        "benchmarks/scaling/layouts.py", "bench-684m-compiled", None,
        "The old 'results' key is named 'runs' here. benchmarks/scaling/model.py takes bench-684m's t_c from it."),
    "bench_scale_1xcuda_h200_v2lite-8l.json": (
        "benchmarks/scaling/layouts.py", "v2lite-8l", None,
        "The old 'results' key is named 'runs' here. benchmarks/scaling/model.py takes v2lite-8l's t_c from it."),
    "scaling_model.json": (
        "benchmarks/scaling/model.py", "", CPU,
        "args: the script's defaults (the old file recorded none); computed on a CPU from the two 1-GPU runs named "
        "in each model's 'from'."),
}


DEFAULT_ARGS = {"scaling_model.json": {"gpus": "8,16,32,64,128,256,1024", "nvlink_gbs": 0.0, "ib_gbs": 50.0}}


def git(*args) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def parse_profile(text: str) -> dict:
    """profile_decode.py's printed table -> the dict it saves per batch size."""
    out, batch, part = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"== batch (\d+): step ([\d.]+) ms \(overlapped ([\d.]+) ms\), graph replay ([\d.]+) ms, "
                         r"(\d+) kernels / step, ([\d.]+) ms of kernel time; warmup ([\d.]+) s", line):
            batch, part = m.group(1), "top_kernels"
            out[batch] = {"warmup_s": float(m.group(7)), "step_ms": float(m.group(2)),
                          "step_ms_overlap": float(m.group(3)), "replay_ms": float(m.group(4)),
                          "kernels_per_step": float(m.group(5)), "kernel_ms_per_step": float(m.group(6)),
                          "top_kernels": [], "top_host_self_us": []}
        elif line.startswith("host (self cpu us per step)"):
            part = "top_host_self_us"
        elif batch and part == "top_kernels" and (m := re.match(r"\s*([\d.]+) us\s+([\d.]+)x  (.*)", line)):
            out[batch][part].append([m.group(3), float(m.group(2)), float(m.group(1))])
        elif batch and part == "top_host_self_us" and (m := re.match(r"\s*([\d.]+) us  (.*)", line)):
            out[batch][part].append([m.group(2), float(m.group(1))])
    return out


def convert(old: str, spec) -> tuple[Path, dict]:
    script, tag, device, extra = spec
    sha, date = git("log", "-1", "--format=%H %cI", "--", str(OLD / old)).split()
    if old.endswith(".txt"):
        content, args = parse_profile((OLD / old).read_text()), {"preset": "bench-684m", "batches": "1"}
    else:
        content = json.loads((OLD / old).read_text())
        args = content.pop("config" if "config" in content else "args", DEFAULT_ARGS.get(old, {}))
    device = device or content.get("device")
    content.pop("device", None)
    torch_version = content.pop("torch", "unknown")
    if set(content) == {"results"}:
        content = content["results"]
    elif "results" in content:  # bench_scale: {"alltoall", "results"}
        content["runs"] = content.pop("results")
    rec = {"schema": SCHEMA, "script": script, "date": date, "device": device, "torch": torch_version,
           "git_sha": sha, "args": args, "results": content,
           "notes": f"Converted from the old layout: benchmarks/results/{old} (written by the script's predecessor "
                    f"at commit {sha[:7]}). " + extra}
    assert tuple(k for k in rec if k != "notes") == KEYS
    name = Path(script).stem + (f"-{tag}" if tag else "")
    stem = f"{name}_{device_slug(device)}_{date[:10]}"
    area = Path(script).parent.name
    path, n = OLD / area / f"{stem}.json", 1
    while path.exists():  # a second run of the same day
        n += 1
        path = OLD / area / f"{stem}-{n}.json"
    assert FILE_NAME.fullmatch(path.name), path
    return path, rec


def main():
    mapping = []
    order = sorted(KEEP, key=lambda f: git("log", "-1", "--format=%cI", "--", str(OLD / f)))  # -2 = later run
    for old in order:
        path, rec = convert(old, KEEP[old])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1) + "\n")
        mapping.append((OLD / old, path))
        png = (OLD / old).with_suffix(".png")
        if png.exists():
            img = Path("docs/img") / path.parent.name / f"{path.stem}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            git("mv", str(png), str(img))
            mapping.append((png, img))
    moved = {str(a) for a, _ in mapping}
    for f in sorted(OLD.glob("*")):
        if f.is_file() and str(f) not in moved:
            mapping.append((f, "DELETED"))
    for old, _ in mapping:
        if Path(old).exists():
            git("rm", "-q", str(old))
    Path(sys.argv[1]).write_text("".join(f"{a}\t{b}\n" for a, b in sorted(mapping, key=lambda x: str(x[0]))))


if __name__ == "__main__":
    main()
