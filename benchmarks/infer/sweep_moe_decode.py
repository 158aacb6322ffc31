"""Block sizes for the routed experts' decode kernels (GPU): each setting of `moe_decode.GATE_UP` / `DOWN` timed on
bench-684m's shapes at batch 1 and 32 (6 of 64 experts per token), 11 layers' weights in turn so that L2 holds no
layer between its calls, as in a decode step; CUDA-graph timing. Prints the fastest five per kernel and batch and
the current defaults.

    python -m benchmarks.infer.sweep_moe_decode
Results: docs/inference.md#decode-speed; saved as benchmarks/results/infer/sweep_moe_decode_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

from benchmarks.results import save
from dsv3.kernels import moe_decode

E, D, F, K, LAYERS = 64, 1024, 256, 6, 11


def case(N, g):
    w1 = [torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(LAYERS)]
    w2 = [torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.06 for _ in range(LAYERS)]
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).cuda().flatten()
    ws = torch.rand(N * K, device="cuda")
    if N * K <= moe_decode.FEW:  # the kernels pick each expert's rows out of the unsorted ones
        return w1, w2, x, idx, idx, ws, False
    offs = torch.bincount(idx, minlength=E).cumsum(0).to(torch.int32)
    return w1, w2, x, idx.argsort(stable=True), offs, ws, True


def sweep():
    g = torch.Generator().manual_seed(0)
    rows = []
    for N in (1, 32):
        w1, w2, x, rows_, offs, ws, sorted_ = case(N, g)
        h = x.new_empty(N * K, F)
        y = x.new_empty(N * K, D)
        for bf, bd, nw, ns in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (2, 4)):
            def gate_up():
                for layer in range(LAYERS):
                    moe_decode._gate_up_kernel[(E, triton.cdiv(F, bf))](
                        x, w1[layer], w1[layer], rows_, offs, ws, h, N * K, K, D, F, x.stride(0),
                        w1[layer].stride(0), w1[layer].stride(1), 0, 0, h.stride(0), BLOCK_M=16, BLOCK_F=bf,
                        BLOCK_D=bd, SORTED=sorted_, SCALED=False, num_warps=nw, num_stages=ns)
            us = do_bench_cudagraph(gate_up) * 1e3 / LAYERS
            rows.append({"kernel": "gate_up", "batch": N, "BLOCK_F": bf, "BLOCK_D": bd, "num_warps": nw,
                         "num_stages": ns, "us": us})
        for bn, bk, nw, ns in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (2, 4)):
            def down():
                for layer in range(LAYERS):
                    moe_decode._down_kernel[(E, triton.cdiv(D, bn))](
                        h, w2[layer], w2[layer], rows_, offs, y, N * K, K, D, F, h.stride(0),
                        w2[layer].stride(0), w2[layer].stride(1), 0, 0, y.stride(0), BLOCK_M=16, BLOCK_N=bn,
                        BLOCK_F=bk, SORTED=sorted_, SCALED=False, num_warps=nw, num_stages=ns)
            us = do_bench_cudagraph(down) * 1e3 / LAYERS
            rows.append({"kernel": "down", "batch": N, "BLOCK_N": bn, "BLOCK_F": bk, "num_warps": nw,
                         "num_stages": ns, "us": us})
    for kern in ("gate_up", "down"):
        for N in (1, 32):
            best = sorted((r for r in rows if r["kernel"] == kern and r["batch"] == N), key=lambda r: r["us"])[:5]
            print(f"{kern} batch {N}:")
            for r in best:
                print("   ", {k: v for k, v in r.items() if k not in ("kernel", "batch")})
            size = "few" if N * K <= moe_decode.FEW else "many"
            cur = (moe_decode.GATE_UP if kern == "gate_up" else moe_decode.DOWN)[size]
            now = [r for r in rows if r["kernel"] == kern and r["batch"] == N
                   and all(r[k] == v for k, v in cur.items())]
            print("    current default:", round(now[0]["us"], 2) if now else None, "us")
    return rows


def main():
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.infer.sweep_moe_decode times Triton kernels: it needs a GPU")
    save(__file__, args, {"rows": sweep()})


if __name__ == "__main__":
    main()
