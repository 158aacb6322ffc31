"""FP8 training end to end on one GPU: `dsv3 train` tokens/s per precision mode (bf16, fp8, fp8 with the routed
experts, compiled, and torchao's FP8 training applied to our model as a peer), same loop, same data, MTP off.

    python -m benchmarks.fp8.train --preset v3-slice --batch-size 2 --seq-len 4096 --model-vocab-size 32000 \
        --data TOK/data --tokenizer TOK/tokenizer --modes bf16,fp8,fp8-experts
    python -m benchmarks.fp8.train --preset 16b-slice ... --modes bf16-compiled,fp8-compiled,torchao-bf16-compiled
MODES (below) is shared with benchmarks/train/loop.py, which times our FP8 beside the peers' bf16.
Results: docs/fp8.md#fp8-training; saved as benchmarks/results/fp8/train-<preset>_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.fp8.gemm import check_quantize
from benchmarks.results import save
from dsv3.model.moe import Experts
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer
from dsv3.train.metrics import read_metrics
from dsv3.train.optim import build_optimizer

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


def train_run(args, mode: str, steps: int, out: Path, **extra) -> list[dict]:
    """One `dsv3 train` run in `mode` (a MODES key, or torchao- and one); its metrics rows with tokens/s."""
    fields = dict(MODES.get(mode.removeprefix("torchao-"), {}))
    cfg = TrainConfig(preset=args.preset, out=str(out), steps=steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, data=[args.data] if args.data else [], tokenizer=args.tokenizer, mtp=False,
                      model_vocab_size=args.model_vocab_size, eval_every=10**9, eval_batches=1, save_every=10**9,
                      keep=1, **(fields | extra))
    trainer = Trainer(cfg)
    if mode.startswith("torchao-"):
        trainer.model = torchao_fp8(trainer.model)
        trainer.opt = build_optimizer(trainer.model, cfg.optim)
    trainer.save = lambda *a, **k: None  # measure training, not checkpoint writing
    trainer.run()
    return [r for r in read_metrics(out) if "tokens_per_s" in r]


def train(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fp8_train_"))
    res = {}
    cuda = torch.cuda.is_available()
    for mode in args.modes.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rows = train_run(args, mode, args.steps, work / mode, warmup=5, lr=1e-4)[args.steps // 2:]
            res[mode] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                         "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
                         "loss_last": rows[-1]["loss"],
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
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
        print(f"{k:<22}{v['tokens_per_s']:>10,.0f}{100 * v['mfu']:>6.1f}%{v['peak_mem_gib'] or 0:>6.1f}"
              + "".join(f"{v['tokens_per_s'] / t:>17.3f}x" for t in base.values()))
    return {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "modes": res}


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of one `dsv3 train` run that train and parity share."""
    p.add_argument("--preset", default="16b-slice")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--model-vocab-size", type=int, default=0, help="embedding rows when larger than the BPE's")
    p.add_argument("--data", help="a token directory (a run's data/) or text files")
    p.add_argument("--tokenizer", help="the tokenizer directory the token files were built with")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--modes", default="bf16,fp8,bf16-compiled,fp8-compiled", help=f"comma-separated of {list(MODES)}")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per mode")
    args = p.parse_args()
    check_quantize()
    save(__file__, args, train(args), tag=args.preset)


if __name__ == "__main__":
    main()
