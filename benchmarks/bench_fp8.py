"""FP8 training on one GPU (issue: FP8 mixed precision), three measurements:

  gemm    TFLOP/s of our FP8 block-scaled GEMMs (1×128 activations × 128×128 weights, cuBLAS through
          torch._scaled_mm; grouped experts through our Triton kernel) against bf16 at DeepSeek-V3 shapes, with the
          quantization of the activation timed in and out, and the error against an fp32 GEMM of the same
          quantized operands (0 would mean identical; ~1e-3 is bf16 output rounding).
  train   end-to-end `dsv3 train` tokens/s, bf16 vs fp8 (same loop, random-free: the shipped corpus), per preset.
  parity  one long run per precision on the same data; smoothed final training loss, relative gap, PNG.

    python benchmarks/bench_fp8.py gemm
    python benchmarks/bench_fp8.py train --preset v3-slice --batch-size 2 --seq-len 4096
    python benchmarks/bench_fp8.py parity --precision bf16 --data TOKENS_DIR --tokenizer TOK_DIR --steps 1000
Writes benchmarks/results/bench_fp8_<what>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsv3.fp8.format import dequantize_blocks  # noqa: E402
from dsv3.fp8.gemm import fp8_mm  # noqa: E402
from dsv3.fp8.quantize import (dequantize_rows, quantize_blocks, quantize_blocks_reference, quantize_rows,  # noqa: E402
                               quantize_rows_reference)
from dsv3.model.moe import Experts  # noqa: E402

RESULTS = Path(__file__).parent / "results"


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
    from dsv3.fp8.grouped import grouped_fp8_mm, grouped_fp8_mm_wgrad
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


MODES = {  # TrainConfig fields per mode; all with bf16 parameters unless named amp (fp32 master + autocast)
    "bf16": dict(param_dtype="bf16", autocast=False),
    "bf16-compiled": dict(param_dtype="bf16", autocast=False, compile=True),
    "fp8": dict(param_dtype="bf16", autocast=False, precision="fp8"),  # linears (min dim 1024), experts bf16
    "fp8-compiled": dict(param_dtype="bf16", autocast=False, precision="fp8", compile=True),
    "fp8-all-linears": dict(param_dtype="bf16", autocast=False, precision="fp8", fp8_min_dim=0),
    "fp8-experts": dict(param_dtype="bf16", autocast=False, precision="fp8", fp8_experts=True),
    "amp": dict(param_dtype="fp32", autocast=True),
    "amp-fp8": dict(param_dtype="fp32", autocast=True, precision="fp8", fp8_experts=True, fp8_min_dim=0),
}


class Pad16Experts(Experts):
    """Routed experts for the torchao peer: every expert's rows padded to a multiple of 16 (what its FP8 grouped
    GEMM needs and torchtitan's MoE does; torchao 0.18 refuses to pad itself), zero rows between the groups."""

    def ffn(self, x_sorted, w_sorted, offs, gate_up_proj=None, down_proj=None):
        R, E = x_sorted.shape[0], offs.shape[0]
        ends = offs.long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        padded = (counts + 15) // 16 * 16
        row = torch.arange(R, device=ends.device)
        e = torch.searchsorted(ends, row, right=True)  # each sorted row's expert
        dest = (padded.cumsum(0) - padded)[e] + row - (ends - counts)[e]
        rows = R + 16 * E
        x = x_sorted.new_zeros(rows, x_sorted.shape[1]).index_copy(0, dest, x_sorted)
        w = w_sorted.new_zeros(rows).index_copy(0, dest, w_sorted)
        return super().ffn(x, w, padded.cumsum(0).to(torch.int32), gate_up_proj, down_proj)[dest]


def torchao_fp8(model):
    """torchao's FP8 training on our own model: rowwise-scaled linears (Float8LinearConfig "rowwise") and, for
    the routed experts, Float8TrainingOpConfig (rowwise FP8 grouped GEMMs, groups padded to 16 by Pad16Experts),
    with the same high-precision exceptions as ours (head, router, eh_proj)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig
    from torchao.quantization import quantize_

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda m, fqn: fqn.startswith("layers.")
                               and not fqn.endswith("eh_proj") and m.in_features % 16 == 0
                               and m.out_features % 16 == 0)
    for m in model.modules():
        if type(m) is Experts:
            m.__class__ = Pad16Experts
    quantize_(model, Float8TrainingOpConfig(), filter_fn=lambda m, fqn: isinstance(m, Experts))
    return model


def train_run(args, mode: str, steps: int, out: Path, **extra):
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import Trainer
    fields = dict(MODES.get(mode.removeprefix("torchao-"), {}))
    cfg = TrainConfig(preset=args.preset, out=str(out), steps=steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, data=[args.data], tokenizer=args.tokenizer, mtp=False,
                      model_vocab_size=args.model_vocab_size, eval_every=10**9, eval_batches=1, save_every=10**9,
                      keep=1, **(fields | extra))
    trainer = Trainer(cfg)
    if mode.startswith("torchao-"):
        trainer.model = torchao_fp8(trainer.model)
        from dsv3.train.optim import build_optimizer
        trainer.opt = build_optimizer(trainer.model, cfg)
    trainer.save = lambda *a, **k: None  # measure training, not checkpoint writing
    trainer.run()
    from dsv3.train.metrics import read_metrics
    return [r for r in read_metrics(out) if "tokens_per_s" in r]


def train(args) -> dict:
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="bench_fp8_"))
    res = {}
    for mode in args.modes.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            rows = train_run(args, mode, args.steps, work / mode, warmup=5, lr=1e-4)[args.steps // 2:]
            res[mode] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                         "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
                         "loss_last": rows[-1]["loss"], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        except Exception as e:
            res[mode] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        shutil.rmtree(work / mode, ignore_errors=True)
        print(mode, json.dumps(res[mode]), flush=True)
    base = {k: v["tokens_per_s"] for k, v in res.items() if k.startswith("bf16") and "tokens_per_s" in v}
    print(f"\n{args.preset} {args.batch_size}x{args.seq_len}")
    print(f"{'mode':<22}{'tokens/s':>10}{'MFU':>7}{'GiB':>6}" + "".join(f"{'vs ' + k:>18}" for k in base))
    for k, v in res.items():
        if "error" in v:
            print(f"{k:<22} {v['error'][:100]}")
            continue
        v.update({f"over_{b}": v["tokens_per_s"] / t for b, t in base.items()})
        print(f"{k:<22}{v['tokens_per_s']:>10,.0f}{100 * v['mfu']:>6.1f}%{v['peak_mem_gib']:>6.1f}"
              + "".join(f"{v['tokens_per_s'] / t:>17.3f}x" for t in base.values()))
    return {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "modes": res}


def parity(args) -> dict:
    """One long run in one precision (its own command); with --compare, the curves of runs already made."""
    runs = Path(args.runs)
    name = args.mode + (f"-seed{args.seed}" if args.seed else "")
    if not args.compare:
        train_run(args, args.mode, args.steps, runs / name, warmup=args.warmup, lr=args.lr, seed=args.seed)
    curves = {}
    from dsv3.train.metrics import read_metrics
    for mode in args.compare.split(",") if args.compare else [name]:
        if not (runs / mode).is_dir():  # a run made in an earlier machine hold: its curve from its results JSON
            saved = json.loads((RESULTS / f"bench_fp8_parity_{mode}.json").read_text())
            curves[mode] = saved["results"]["curves"][mode]
            continue
        rows = [r for r in read_metrics(runs / mode) if "loss" in r and "tokens_per_s" in r]
        curves[mode] = {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:])}
    # A run cut short (a lost machine) still compares: at the steps all runs reached, with the same LR schedule.
    last = min(c["step"][-1] for c in curves.values())
    smooth = {m: statistics.fmean([x for s, x in zip(c["step"], c["loss"]) if s <= last][-args.smooth:])
              for m, c in curves.items()}
    out = {"steps": args.steps, "tokens": args.steps * args.batch_size * args.seq_len, "compared_at_step": last,
           "smooth_window": args.smooth, "smoothed_final_loss": smooth, "curves": curves}
    if args.compare:  # the first run is the reference; every other one's relative gap to it
        a, *others = args.compare.split(",")
        out["relative_gap"] = {m: (smooth[m] - smooth[a]) / smooth[a] for m in others}
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for m, c in curves.items():
            ema, e = [], c["loss"][0]
            for x in c["loss"]:
                e = 0.98 * e + 0.02 * x
                ema.append(e)
            line, = ax.plot(c["step"], ema, label=f"{m} (final {smooth[m]:.4f}, {c['tokens_per_s']:,.0f} tok/s)")
            ax.plot(c["step"], c["loss"], alpha=0.2, lw=0.5, color=line.get_color())
        gaps = ", ".join(f"{m} {100 * g:+.2f}%" for m, g in out["relative_gap"].items())
        ax.set(xlabel="step", ylabel="training loss", ylim=(min(smooth.values()) - 0.3, min(smooth.values()) + 2.5),
               title=f"{args.preset} {args.batch_size}x{args.seq_len}, gap to {a} "
                     f"(steps {last - args.smooth + 1}-{last}): {gaps}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(RESULTS / f"bench_fp8_parity_{args.compare.replace(',', '_')}.png", dpi=120, bbox_inches="tight")
        print(f"smoothed loss (mean of steps {last - args.smooth + 1}-{last}): {smooth}; relative gap to {a}: {gaps}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("gemm")
    for name in ("train", "parity"):
        q = sub.add_parser(name)
        q.add_argument("--preset", default="16b-slice")
        q.add_argument("--batch-size", type=int, default=4)
        q.add_argument("--seq-len", type=int, default=4096)
        q.add_argument("--model-vocab-size", type=int, default=0)
        q.add_argument("--data", help="a token directory (a run's data/) or text files (not for --compare)")
        q.add_argument("--tokenizer", help="the tokenizer directory the token files were built with")
    t = sub.choices["train"]
    t.add_argument("--modes", default="bf16,fp8,bf16-compiled,fp8-compiled", help=f"comma-separated of {list(MODES)}")
    t.add_argument("--steps", type=int, default=30)
    q = sub.choices["parity"]
    q.add_argument("--mode", default="amp")
    q.add_argument("--compare", default="", help="REF,RUN,...: compare finished runs (their directories in --runs)")
    q.add_argument("--runs", default="runs/fp8_parity")
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--lr", type=float, default=6e-4)
    q.add_argument("--warmup", type=int, default=100)
    q.add_argument("--seed", type=int, default=0, help="init and data-order seed (another seed: run-to-run spread)")
    q.add_argument("--smooth", type=int, default=100, help="final loss = mean of the last N steps' losses")
    args = p.parse_args()
    if args.what != "gemm" and not getattr(args, "compare", ""):
        check_quantize()
    result = {"gemm": gemm, "train": train, "parity": parity}[args.what](args)
    RESULTS.mkdir(exist_ok=True)
    tag = {"gemm": "gemm", "train": f"train_{getattr(args, 'preset', '')}",
           "parity": "parity_" + (getattr(args, "compare", "").replace(",", "_")
                                  or getattr(args, "mode", "") + (f"-seed{args.seed}" if getattr(args, "seed", 0)
                                                                  else ""))}
    path = RESULTS / f"bench_fp8_{tag[args.what]}.json"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (comparing GPU runs)"
    path.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                "args": {k: v for k, v in vars(args).items()}, "results": result}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
