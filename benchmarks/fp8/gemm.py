"""FP8 training's GEMMs on one GPU: TFLOP/s of our FP8 block-scaled GEMMs (1×128 activations × 128×128 weights,
cuBLAS through torch._scaled_mm; grouped experts through our Triton kernel and the per-expert cuBLAS path) against
bf16 at DeepSeek-V3 and slice shapes, with the quantization of the inputs timed in and out, the error against an fp32
GEMM of the same quantized operands (0 would mean identical; ~1e-3 is bf16 output rounding), and the quantize
kernels bit for bit against their torch references (benchmarks/fp8/train.py and parity.py check that first too).

    python -m benchmarks.fp8.gemm
Results: docs/fp8.md; saved as benchmarks/results/fp8/gemm_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks.results import save
from dsv3.fp8.format import dequantize_blocks
from dsv3.fp8.gemm import fp8_mm
from dsv3.fp8.grouped import grouped_fp8_mm, grouped_fp8_mm_wgrad
from dsv3.fp8.quantize import (dequantize_rows, quantize_blocks, quantize_blocks_reference, quantize_rows,
                               quantize_rows_reference)


def bench(fn, warmup=5, reps=15, inner=10) -> float:
    """ms per call: median over `reps` of `inner` back-to-back calls timed with CUDA events (the GPU queue stays
    full, as in training, so Python launch overhead hides behind the kernels instead of being timed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def quantize_exact(dev="cuda") -> dict:
    """The quantize kernels bit for bit against the torch references on the GPU, per input dtype: activations
    (rows and xᵀ) and weights (blocks and qᵀ; fp32 master weights and bf16 ones take different paths)."""
    out, u8 = {}, lambda t: t.view(torch.uint8)
    x = torch.randn(4096, 7168 + 64, device=dev) * torch.logspace(-3, 3, 7168 + 64, device=dev)
    w = torch.randn(4, 1024 + 64, 2048 + 64, device=dev) * torch.logspace(-2, 2, 2048 + 64, device=dev)
    for ue8m0 in (False, True):
        for dt in (torch.float32, torch.bfloat16):
            q, s, qt, st = quantize_rows(x.to(dt), ue8m0, both=True)
            rq, rs = quantize_rows_reference(x.to(dt), ue8m0)
            rqt, rst = quantize_rows_reference(x.to(dt).t(), ue8m0)
            out[f"rows_{dt}_ue8m0={ue8m0}"] = bool(torch.equal(u8(q), u8(rq)) and torch.equal(s, rs)
                                                   and torch.equal(u8(qt), u8(rqt)) and torch.equal(st, rst))
            q, s, qt = quantize_blocks(w.to(dt), ue8m0, transposed=True)
            rq, rs = quantize_blocks_reference(w.to(dt), ue8m0)
            out[f"blocks_{dt}_ue8m0={ue8m0}"] = bool(torch.equal(u8(q), u8(rq)) and torch.equal(s, rs)
                                                     and torch.equal(u8(qt), u8(rq.transpose(-1, -2).contiguous())))
    return out


def check_quantize():
    """Stop if a quantize kernel is not bit-exact on this GPU: every FP8 number after it would be wrong (Triton 3.6
    once stored qᵀ wrongly for fp32 weights)."""
    if torch.cuda.is_available() and (bad := [k for k, ok in quantize_exact().items() if not ok]):
        sys.exit(f"FP8 quantize kernels differ from the torch reference on this GPU: {bad}")


def gemm(args) -> dict:
    dev = "cuda"
    rows, out = [], {"quantize_bitexact": quantize_exact(dev)}
    # DeepSeek-V3 shapes (the two first), then v3-slice's and 16b-slice's linears at their batch's tokens
    shapes = [(4096, 7168, 2048), (4096, 2048, 7168), (8192, 7168, 18432), (8192, 18432, 7168), (8192, 1536, 24576),
              (8192, 16384, 7168), (8192, 7168, 1536), (16384, 2048, 3072), (16384, 2048, 2048),
              (16384, 2048, 2816), (16384, 2816, 2048), (16384, 2048, 10944), (16384, 512, 4096), (16384, 2048, 576)]
    for M, K, N in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        xs = [torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
        dys = [torch.randn(M, N, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
        w = torch.randn(N, K, device=dev, generator=g) * 0.02
        wb = w.bfloat16()
        wq, ws, wqt = quantize_blocks(w, transposed=True)
        qs = [quantize_rows(t, both=True) for t in xs]
        gs = [quantize_rows(t, both=True) for t in dys]
        flop = 2 * M * N * K
        i = iter(range(10**9))
        rec = {"M": M, "K": K, "N": N}
        # The three GEMMs of a linear as training runs them: bf16, and FP8 with its inputs' quantization timed in
        # (the weight's block quantization is once per step, not counted) and out (GEMM alone).
        bf16 = {"fprop": lambda: xs[next(i) % 3] @ wb.t(), "dgrad": lambda: dys[next(i) % 3] @ wb,
                "wgrad": lambda: dys[next(i) % 3].t() @ xs[next(i) % 3]}
        fp8 = {"fprop": lambda q: fp8_mm(q[0], q[1], wq, ws, True),
               "dgrad": lambda q: fp8_mm(q[0], q[1], wqt, ws.t(), True),
               "wgrad": lambda q, x: fp8_mm(q[2], q[3], x[2], x[3], False, torch.float32)}
        try:
            y = fp8_mm(qs[0][0], qs[0][1], wq, ws, True, torch.float32)
            ref = dequantize_rows(qs[0][0], qs[0][1]) @ dequantize_blocks(wq, ws).t()
            rec["err_vs_fp32_same_operands"] = ((y - ref).norm() / ref.norm()).item()
            for name in ("fprop", "dgrad", "wgrad"):
                t_b = bench(bf16[name])
                if name == "wgrad":  # its inputs were quantized for fprop and dgrad (`both`): nothing to add
                    t_f = t_q = bench(lambda: fp8[name](gs[next(i) % 3], qs[next(i) % 3]))
                else:
                    src, raw = (qs, xs) if name == "fprop" else (gs, dys)
                    t_f = bench(lambda: fp8[name](src[next(i) % 3]))
                    t_q = bench(lambda: fp8[name](quantize_rows(raw[next(i) % 3], both=True)))
                rec[name] = {"bf16_tflops": flop / t_b / 1e9, "fp8_tflops": flop / t_f / 1e9,
                             "fp8_with_quant_tflops": flop / t_q / 1e9, "speedup": t_b / t_f,
                             "speedup_with_quant": t_b / t_q}
        except Exception as e:  # a shape the block-scaled cuBLAS path refuses: say so
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    out["gemm"] = rows
    try:
        out["grouped"] = grouped(args)
    except ImportError as e:
        out["grouped"], out["grouped_error"] = [], str(e)
    print(f"\n{'M':>6} {'K':>6} {'N':>6}" + "".join(f"{g + ' bf16/fp8/fp8+q':>26}"
                                                    for g in ("fprop", "dgrad", "wgrad")))
    for r in rows:
        if "error" in r:
            print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6}  {r['error'][:80]}")
            continue
        print(f"{r['M']:>6} {r['K']:>6} {r['N']:>6}" + "".join(
            f"{r[g]['bf16_tflops']:>10.0f}{r[g]['fp8_tflops']:>6.0f}{r[g]['fp8_with_quant_tflops']:>6.0f} "
            f"{r[g]['speedup_with_quant']:>3.2f}" for g in ("fprop", "dgrad", "wgrad")))
    print(f"\n{'experts':>22} {'bf16':>8} {'fp8':>8} {'x':>6} {'wgrad bf16':>11} {'fp8':>8} {'x':>6} {'err':>8}"
          f" {'cuBLAS x':>9} {'wgrad x':>8}")
    for r in out["grouped"]:
        print(f"{r['name']:>22} {r['bf16_tflops']:>8.0f} {r.get('fp8_tflops', 0):>8.0f} {r.get('speedup', 0):>6.2f} "
              f"{r['wgrad_bf16_tflops']:>11.0f} {r.get('wgrad_fp8_tflops', 0):>8.0f} "
              f"{r.get('wgrad_speedup', 0):>6.2f} {r.get('err', float('nan')):>8.1e}"
              f" {r.get('cublas_speedup', 0):>9.2f} {r.get('cublas_wgrad_speedup', 0):>8.2f}")
    print("quantize kernels bit-exact against torch:", out["quantize_bitexact"])
    return out


def grouped(args) -> list[dict]:
    dev, res = "cuda", []
    # (name, experts, rows per expert, K, N): 16b-slice (4 x 4096 tokens, top-6 of 64) and v3-slice (2 x 4096, 8 of 16)
    for name, E, per, K, N in [("16b gate_up", 64, 1536, 2048, 2816), ("16b down", 64, 1536, 1408, 2048),
                               ("v3 gate_up", 16, 4096, 7168, 4096), ("v3 down", 16, 4096, 2048, 7168)]:
        R = E * per
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(R, K, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, generator=g) * 0.02
        wb = w.bfloat16()
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
        flop = 2 * R * N * K
        t_bf16 = bench(lambda: torch._grouped_mm(x, wb.transpose(1, 2), offs=offs))
        dy = torch.randn(R, N, device=dev, generator=g, dtype=torch.bfloat16)
        t_wg_bf16 = bench(lambda: torch._grouped_mm(dy.t(), x, offs=offs))
        rec = {"name": name, "E": E, "rows_per_expert": per, "K": K, "N": N, "bf16_tflops": flop / t_bf16 / 1e9,
               "wgrad_bf16_tflops": flop / t_wg_bf16 / 1e9}
        try:
            xq, xs = quantize_rows(x)
            wq, ws = quantize_blocks(w)
            y = grouped_fp8_mm(xq, xs, wq, ws, offs, torch.float32)
            ref = torch.cat([dequantize_rows(xq[e * per:(e + 1) * per], xs[e * per:(e + 1) * per])
                             @ dequantize_blocks(wq[e], ws[e]).t() for e in range(E)])
            rec["err"] = ((y - ref).norm() / ref.norm()).item()
            # Block shapes, warps and stages: the best of a few (the kernels' defaults are the first).
            fwd = {c: bench(lambda: grouped_fp8_mm(xq, xs, wq, ws, offs, block_m=c[0], block_n=c[1],
                                                    num_warps=c[2], num_stages=c[3], backend="triton"), reps=5)
                   for c in [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4)]}
            gq, gs, gtq, gts = quantize_rows(dy, both=True)
            _, _, xtq, xts = quantize_rows(x, both=True)
            wg = {c: bench(lambda: grouped_fp8_mm_wgrad(gtq, gts, xtq, xts, offs, block_n=c[0], block_k=c[1],
                                                        num_warps=c[2], num_stages=c[3], backend="triton"), reps=5)
                  for c in [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4)]}
            # The per-expert cuBLAS path (one block-scaled GEMM per expert, after a host sync for the group ends)
            t_cb = bench(lambda: grouped_fp8_mm(xq, xs, wq, ws, offs, backend="cublas"), reps=5)
            t_cb_wg = bench(lambda: grouped_fp8_mm_wgrad(gtq, gts, xtq, xts, offs, backend="cublas"), reps=5)
            y_cb = grouped_fp8_mm(xq, xs, wq, ws, offs, torch.float32, backend="cublas")
            rec.update(cublas_speedup=t_bf16 / t_cb, cublas_wgrad_speedup=t_wg_bf16 / t_cb_wg,
                       cublas_err=((y_cb - ref).norm() / ref.norm()).item())
            (cf, t), (cw, t_wg) = min(fwd.items(), key=lambda kv: kv[1]), min(wg.items(), key=lambda kv: kv[1])
            rec.update(fp8_tflops=flop / t / 1e9, speedup=t_bf16 / t, wgrad_fp8_tflops=flop / t_wg / 1e9,
                       wgrad_speedup=t_wg_bf16 / t_wg, best_fwd_config=cf, best_wgrad_config=cw,
                       fwd_ms={str(k): v for k, v in fwd.items()}, wgrad_ms={str(k): v for k, v in wg.items()})
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(rec), flush=True)
        res.append(rec)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.fp8.gemm times CUDA kernels: it needs a GPU")
    save(__file__, args, gemm(args))


if __name__ == "__main__":
    main()
