"""Where a decode step goes (GPU): the engine's step time (with and without overlapped decode) next to its CUDA graph's
replay alone, and the kernels in a step by device time (torch.profiler), on the random-weight model of
benchmarks/infer/decode.py. For comparison: `--no-split`, the decode kernel with one program per sequence;
`--unfused`, the step without the small-batch fusions (routed experts through the grouped GEMM, separate
projections, top-k by sort); `--pieces`, graphs recorded with compiled pieces of the model rather than its whole
compiled forward.

  python -m benchmarks.infer.profile_decode --preset bench-684m --batches 1,32 [--no-split] [--unfused] [--pieces]
                                            [--fp8-weights]
Prints a table per batch size. Results: docs/inference.md#decode-speed; saved as
benchmarks/results/infer/profile_decode-<preset>[-no-split][-unfused][-pieces][-fp8]_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from benchmarks.results import save
from dsv3 import Engine, EngineConfig, SamplingParams, preset
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.fp8 import fp8_weights
from dsv3.infer import cuda_graphs, transform
from dsv3.io.hf import build_model
from dsv3.kernels import mla_decode, moe_decode
from dsv3.model import moe


def steady_engine(model, tok, B, prompt_len, overlap):
    """An engine whose B sequences all decode (prefill done, 10 steps in)."""
    engine = Engine(model, tok, EngineConfig(max_num_seqs=B, num_blocks=B * 40 + 8, overlap=overlap))
    t = time.perf_counter()
    engine.warmup()
    engine.warmup_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(B)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for p in torch.randint(2, tok.vocab_size, (B, prompt_len), generator=g).tolist():
        engine.add_request(p, params)
    while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(10):
        engine.step()
    return engine


def step_ms(engine, steps):
    """Median wall time of engine.step() in steady decode (no device sync: see benchmarks/infer/decode.run_ours)."""
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    return 1e3 * statistics.median(walls)


def profile(model, tok, B, prompt_len, steps):
    plain = steady_engine(model, tok, B, prompt_len, overlap=False)
    plain_ms, warmup_s = step_ms(plain, steps), plain.warmup_s  # the first engine compiles (once per process)
    del plain
    torch.cuda.empty_cache()
    engine = steady_engine(model, tok, B, prompt_len, overlap=True)
    overlap_ms = step_ms(engine, steps)
    runner = engine._decode
    graph, _ = runner.captured[next(b for b in runner.buckets if b >= B)]
    replays = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        replays.append(a.elapsed_time(b) / 1e3)
    n = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time_total  # microseconds
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    gpu_us = sum(v[1] for v in kernels.values()) / n
    host = sorted(((e.key, e.self_cpu_time_total / n) for e in prof.key_averages()), key=lambda x: -x[1])[:15]
    return {"warmup_s": warmup_s, "step_ms": plain_ms, "step_ms_overlap": overlap_ms,
            "replay_ms": 1e3 * statistics.median(replays),
            "kernels_per_step": sum(v[0] for v in kernels.values()) / n, "kernel_ms_per_step": gpu_us / 1e3,
            "top_kernels": [(name, c / n, us / n) for name, (c, us) in top[:25]],
            "top_host_self_us": host}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--no-split", action="store_true", help="one program per sequence in the decode kernel")
    p.add_argument("--unfused", action="store_true", help="grouped GEMM experts, separate projections, sort top-k")
    p.add_argument("--pieces", action="store_true", help="graphs with compiled pieces, not the whole forward")
    p.add_argument("--fp8-weights", action="store_true", help="decoder weights in FP8 (dsv3/fp8/inference.py), "
                                                              "converted before any engine")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.infer.profile_decode profiles CUDA graphs: it needs a GPU")
    if args.no_split:
        mla_decode.num_splits = lambda *_: 1
    if args.pieces:
        cuda_graphs.WHOLE_FORWARD = False
    if args.unfused:
        moe_decode.usable = lambda *_: False
        moe.RANK_TOPK_MAX = 0
        transform.fuse_rows = lambda fused, *linears: None
    tok = train_bpe(read_documents(None), 1024)
    torch.manual_seed(0)
    model = build_model(preset(args.preset).replace(num_nextn_predict_layers=0), "cuda", torch.bfloat16)
    model.init_weights()
    model.eval()
    if args.fp8_weights:
        fp8_weights(model)
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        r = results[B] = profile(model, tok, B, args.prompt_len, args.steps)
        print(f"\n== batch {B}: step {r['step_ms']:.3f} ms (overlapped {r['step_ms_overlap']:.3f} ms), graph replay "
              f"{r['replay_ms']:.3f} ms, "
              f"{r['kernels_per_step']:.0f} kernels / step, {r['kernel_ms_per_step']:.3f} ms of kernel time; "
              f"warmup {r['warmup_s']:.1f} s")
        for name, c, us in r["top_kernels"]:
            print(f"{us:9.1f} us {c:6.1f}x  {name}")
        print("host (self cpu us per step):")
        for name, us in r["top_host_self_us"]:
            print(f"{us:9.1f} us  {name[:90]}")
    tags = "".join(f"-{t}" for t, on in (("no-split", args.no_split), ("unfused", args.unfused),
                                         ("pieces", args.pieces), ("fp8", args.fp8_weights)) if on)
    save(__file__, args, results, tag=args.preset + tags)


if __name__ == "__main__":
    main()
