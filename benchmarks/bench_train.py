"""`dsv3 train` throughput on one GPU: the real training loop (data loader, balance-bias updates, MTP off, metrics)
in several precision / compile modes, next to transformers' DeepseekV3ForCausalLM timed in the same run.

Modes: amp (fp32 master weights + bf16 autocast, our default), bf16 (bf16 parameters, the peers' setting),
bf16-compiled (bf16 parameters, each block torch.compile'd). Reported: median tokens/s over the second half of
the steps, MFU (989 TFLOP/s bf16 dense; dsv3.info's training FLOPs/token), peak memory.

  python benchmarks/bench_train.py --preset bench-684m --batch-size 8 --seq-len 2048 --vocab-size 32000
Writes benchmarks/results/bench_train_<preset>_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsv3.train.config import TrainConfig  # noqa: E402
from dsv3.train.loop import Trainer  # noqa: E402
from dsv3.train.metrics import read_metrics  # noqa: E402

MODES = {"amp": dict(param_dtype="fp32", autocast=True), "bf16": dict(param_dtype="bf16", autocast=False),
         "bf16-compiled": dict(param_dtype="bf16", autocast=False, compile=True)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--modes", default="amp,bf16,bf16-compiled", help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE trained on the shipped corpus")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers on the same config (bench_forward's loop)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    results, tokenizer = {}, None
    for mode in args.modes.split(","):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(preset=args.preset, out=str(work / mode), steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer=tokenizer, mtp=False,
                          warmup=5, lr=1e-3, eval_every=10**9, eval_batches=1, save_every=10**9, keep=1,
                          **MODES[mode])
        trainer = Trainer(cfg)
        tokenizer = str(work / mode / "tokenizer")  # later modes reuse the BPE
        trainer.save = lambda *a, **k: None  # measure training, not checkpoint writing
        trainer.run()
        rows = [r for r in read_metrics(work / mode) if "tokens_per_s" in r][args.steps // 2:]
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        results[f"dsv3 {mode}"] = {"tokens_per_s": tps, "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
                                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
                                   if torch.cuda.is_available() else None}
        del trainer
    if args.peer:
        import bench_forward as bf
        from dsv3 import preset
        from dsv3.info import model_stats
        fargs = argparse.Namespace(device="cuda" if torch.cuda.is_available() else "cpu", steps=10, warmup=3,
                                   batch_size=args.batch_size, seq_len=args.seq_len)
        mcfg = preset(args.preset).replace(num_nextn_predict_layers=0, vocab_size=args.vocab_size)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(mcfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(fargs.device)
                   for _ in range(13)]
        bf.free(fargs.device)
        _, _, init_sd = bf.build_ours(mcfg, fargs.device, torch.bfloat16, False, True)
        model, forward, _ = bf.build_peer(mcfg, fargs.device, torch.bfloat16, init_sd)
        r = bf.time_model("transformers", model, forward, batches, fargs)
        r["mfu"] = r["tokens_per_s"] * model_stats(mcfg, args.seq_len)["training_flops_per_token"] / bf.PEAK_FLOPS
        results["transformers bf16"] = r
    peer = results.get("transformers bf16")
    print(f"\n{'mode':<22}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'vs HF':>8}")
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else "-"
        print(f"{name:<22}{r['tokens_per_s']:>12,.0f}{100 * (r['mfu'] or 0):>7.1f}%{mem:>10}{ratio:>8}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(__file__).parent / "results" / f"bench_train_{args.preset}_{'cuda' if peer and device != 'cpu' else 'cpu'}.json"
    out.write_text(json.dumps({"args": vars(args), "device": device, "torch": torch.__version__,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
