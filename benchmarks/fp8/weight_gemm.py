"""FP8 weights at decode, one linear at a time: y = x·Wᵀ for a few rows x against W in e4m3 with 128×128 block scales
(dsv3/fp8/gemm.py: the split-K kernel, and the kernel that does not split), next to cuBLAS on the same W in bf16, at
the shapes of deepseek-v2-lite's and DeepSeek-V3's decoder linears. Each time is a CUDA graph of 20 calls over 20
different weights (so W comes from memory, not from the 50 MB L2), replayed; the read floor is the bytes of W over
the copy rate measured in the same run. Errors: against float64 on the dequantized W.

    python -m benchmarks.fp8.weight_gemm [--rows 1,16]                # a GPU
Results: docs/fp8.md#fp8-inference-weights; saved as benchmarks/results/fp8/weight_gemm_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.infer.decode import copy_bandwidth
from benchmarks.results import save
from dsv3.fp8 import gemm
from dsv3.fp8.format import dequantize_blocks, quantize

# (name, N, K): the linears FP8 converts, as (out_features, in_features)
SHAPES = [
    ("v2-lite q_proj", 3072, 2048), ("v2-lite kv_a_proj", 576, 2048), ("v2-lite o_proj", 2048, 2048),
    ("v2-lite shared gate_up", 5632, 2048), ("v2-lite shared down", 2048, 2816),
    ("v3 q_a_proj", 1536, 7168), ("v3 q_b_proj", 24576, 1536), ("v3 kv_a_proj", 576, 7168),
    ("v3 o_proj", 7168, 16384), ("v3 shared gate_up", 4096, 7168), ("v3 shared down", 7168, 2048),
]
SPLIT_WAVES = 2  # programs per SM the split-K form aims at
COPIES = 20  # weights per graph: 20 × (the largest W, 176 MB for v3 q_b) stays within memory, far over L2


def graph_ms(fn, xs, ws) -> float:
    """ms per call: a graph of COPIES calls, each on its own weight, replayed; median of 20 replays."""
    for x, w in zip(xs, ws):
        fn(x, w)  # compile, tickets, cuBLAS heuristics: outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x, w in zip(xs, ws):
            fn(x, w)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / COPIES)
    return sorted(times)[len(times) // 2]


def one(name, N, K, M, bw) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    fp8 = [quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05) for _ in range(COPIES)]
    bf16 = [dequantize_blocks(q, s).bfloat16() for q, s in fp8]
    xs = [torch.randn(M, K, device="cuda", generator=g).bfloat16() for _ in range(COPIES)]
    ref = xs[0].double() @ dequantize_blocks(*fp8[0], torch.float64).t()
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    def with_waves(waves):
        def mm(x, w):
            saved, gemm.SPLIT_K_WAVES = gemm.SPLIT_K_WAVES, waves
            try:
                return gemm.fp8_weight_mm(x, *w)
            finally:
                gemm.SPLIT_K_WAVES = saved
        return mm
    split, plain = with_waves(SPLIT_WAVES), with_waves(0)  # plain: the few-rows kernel that does not split
    r = {"shape": name, "N": N, "K": K, "rows": M,
         "cublas_bf16_ms": graph_ms(lambda x, w: F.linear(x, w), xs, bf16),
         "fp8_split_ms": graph_ms(split, xs, fp8), "fp8_plain_ms": graph_ms(plain, xs, fp8),
         "fp8_split_err": err(split(xs[0], fp8[0])), "fp8_plain_err": err(plain(xs[0], fp8[0]))}
    r["floor_bf16_ms"] = 1e3 * N * K * 2 / bw
    r["floor_fp8_ms"] = 1e3 * (N * K + fp8[0][1].numel() * 4) / bw
    r["split_over_cublas"] = r["cublas_bf16_ms"] / r["fp8_split_ms"]
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,16", help="rows of x (decode batch sizes), comma-separated")
    args = p.parse_args()
    bw = copy_bandwidth("cuda")
    rows = []
    for M in map(int, args.rows.split(",")):
        for name, N, K in SHAPES:
            r = one(name, N, K, M, bw)
            rows.append(r)
            us = {k: r[k] * 1e3 for k in ("cublas_bf16_ms", "fp8_split_ms", "fp8_plain_ms")}
            print(f"{name:24s} M={M:2d}  cuBLAS bf16 {us['cublas_bf16_ms']:7.1f} us "
                  f"({r['floor_bf16_ms'] / r['cublas_bf16_ms']:4.0%} of floor)  FP8 split {us['fp8_split_ms']:7.1f} us "
                  f"({r['floor_fp8_ms'] / r['fp8_split_ms']:4.0%})  FP8 unsplit {us['fp8_plain_ms']:7.1f} us  "
                  f"cuBLAS/split {r['split_over_cublas']:.2f}x  err {r['fp8_split_err']:.1e}", flush=True)
    results = {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}
    print(json.dumps({"copy_bandwidth_GBps": bw / 1e9}))
    save(__file__, args, results)


if __name__ == "__main__":
    main()
