"""`dsv3 train` throughput on one GPU: the real training loop (data loader, balance-bias updates, MTP off, metrics)
in several precision / compile modes, next to transformers' DeepseekV3ForCausalLM timed in the same run.

Modes: amp (fp32 master weights + bf16 autocast, our default), bf16 (bf16 parameters, the peers' setting),
bf16-compiled (bf16 parameters, each block torch.compile'd), and benchmarks/fp8/train.py's FP8 modes (fp8,
fp8-compiled, ...), so our FP8 is timed beside the peers' bf16 in one run. Peers: transformers' DeepseekV3ForCausalLM
(grouped_mm experts, sdpa) and torchtitan 0.2.2's DeepSeekV3Model, eager and compiled per block as torchtitan
does, timed on the same config (bf16 parameters, fused AdamW, random tokens). Reported: median tokens/s over the
second half of the steps (peers: mean over 10 steps after 3 warm-up steps), MFU (the GPU's dense bf16 peak, dsv3.train.metrics.peak_flops;
dsv3.info's training FLOPs/token), peak memory.

  python -m benchmarks.train.loop --preset bench-684m --batch-size 8 --seq-len 2048 --vocab-size 32000
  python -m benchmarks.train.loop --preset 16b-slice --batch-size 4 --seq-len 4096 --vocab-size 32000 \
      --model-vocab-size 102400 --modes bf16,bf16-compiled
  python -m benchmarks.train.loop --preset v3-slice --batch-size 2 --seq-len 4096 --vocab-size 32000 \
      --modes bf16-compiled,fp8-compiled --peers torchtitan-compiled
torchtitan is carried to the GPU machine as wheels: torchtitan==0.2.2 tyro typeguard docstring-parser torchdata
datasets dill multiprocess.
Results: docs/training.md, docs/fp8.md#fp8-training; saved as
benchmarks/results/train/loop-<preset>_<device>_<date>.json (rewritten after every model, so a later failure keeps
what was measured).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.fp8.gemm import check_quantize
from benchmarks.fp8.train import MODES  # amp, bf16, bf16-compiled and the fp8 modes
from benchmarks.results import save
from benchmarks.train import step
from dsv3 import preset
from dsv3.info import model_stats
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer
from dsv3.train.metrics import peak_flops, read_metrics


def build_torchtitan(cfg, seq_len, device, compile_):
    """torchtitan 0.2.2's DeepSeekV3Model of the same shapes, set up as its trainer does on one GPU: its own
    init, grouped-mm experts, SDPA causal attention; compiled per block (and the loss) with its apply_compile.
    Its aux-loss-free bias update lives in its optimizer hook, which is not run here."""
    # torchtitan is a peer carried as wheels to the GPU machine, not a dependency: imported only when timed
    from torchtitan.config.job_config import Compile
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, DeepSeekV3ModelArgs
    from torchtitan.models.llama4.infra.parallelize import apply_compile
    from torchtitan.models.moe import MoEArgs

    args = DeepSeekV3ModelArgs(
        max_seq_len=seq_len, vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
        moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
                         score_func=cfg.scoring_func, route_norm=cfg.norm_topk_prob,
                         route_scale=cfg.routed_scaling_factor, top_k=cfg.num_experts_per_tok,
                         num_expert_groups=cfg.n_group if cfg.n_group > 1 else None,
                         num_limited_groups=cfg.topk_group if cfg.n_group > 1 else None,
                         use_grouped_mm=device != "cpu"),
        q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attn_type="sdpa",
        attn_mask_type="causal", original_seq_len=max(seq_len, 4096), rope_theta=cfg.rope_theta)
    args.moe_impl = "standard"
    with torch.device(device):
        model = DeepSeekV3Model(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device(device))
    model = model.to(torch.bfloat16)

    def loss(logits, labels):  # torchtitan.components.loss.cross_entropy_loss
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    if compile_:
        apply_compile(model, Compile(enable=True), ep_enabled=False)
        loss = torch.compile(loss)
    return model, (lambda ids: loss(model(ids[:, :-1]), ids[:, 1:]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--modes", default="amp,bf16,bf16-compiled", help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE trained on the shipped corpus")
    p.add_argument("--model-vocab-size", type=int, default=0,
                   help="embedding rows when larger than the BPE's (the peers' 16b-slice uses 102400)")
    p.add_argument("--peers", default="transformers,torchtitan,torchtitan-compiled",
                   help="comma-separated, timed on the same config in benchmarks/train/step.py's loop (bf16 "
                        "parameters, fused AdamW, random tokens): transformers, torchtitan, torchtitan-compiled; "
                        "'' for none")
    return p.parse_args()


def time_ours(args, mode: str, work: Path, tokenizer: str | None) -> dict:
    """`dsv3 train` in one mode: median tokens/s and MFU over the second half of the steps, peak memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(preset=args.preset, out=str(work / mode), steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, vocab_size=args.vocab_size, model_vocab_size=args.model_vocab_size,
                      tokenizer=tokenizer, mtp=False,
                      warmup=5, lr=1e-3, eval_every=10**9, eval_batches=1, save_every=10**9, keep=1,
                      **MODES[mode])
    trainer = Trainer(cfg)
    trainer.save = lambda *a, **k: None  # measure training, not checkpoint writing
    trainer.run()
    rows = [r for r in read_metrics(work / mode) if "tokens_per_s" in r][args.steps // 2:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def time_peer(args, name: str) -> dict:
    """A peer in step.py's timing loop: 3 warm-up steps, then the mean over 10, on random tokens."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fargs = argparse.Namespace(device=dev, steps=10, warmup=3, batch_size=args.batch_size, seq_len=args.seq_len)
    mcfg = preset(args.preset).replace(num_nextn_predict_layers=0).with_vocab(
        max(args.vocab_size, args.model_vocab_size))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(mcfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(dev)
               for _ in range(13)]
    step.free(dev)
    if name == "transformers":
        _, _, init_sd = step.build_ours(mcfg, dev, torch.bfloat16, False, True)
        model, loss_fn, _ = step.build_peer(mcfg, dev, torch.bfloat16, init_sd)
        del init_sd
    else:
        model, loss_fn = build_torchtitan(mcfg, args.seq_len, dev, compile_=name == "torchtitan-compiled")
    r = step.time_model(name, model, loss_fn, batches, fargs)
    peak = peak_flops(torch.device(dev))
    r["mfu"] = r["tokens_per_s"] * model_stats(mcfg, args.seq_len)["training_flops_per_token"] / peak if peak else None
    return r


def main():
    args = parse_args()
    if "fp8" in args.modes:
        check_quantize()
    work = Path(tempfile.mkdtemp(prefix="train_loop_"))
    results, tokenizer, path = {}, None, None
    for mode in args.modes.split(","):
        results[f"dsv3 {mode}"] = time_ours(args, mode, work, tokenizer)
        tokenizer = str(work / mode / "tokenizer")  # later modes reuse the BPE
        path = save(__file__, args, results, tag=args.preset, update=path)  # after every model
    for name in [p for p in args.peers.split(",") if p]:
        results[f"{name} bf16"] = time_peer(args, name)
        path = save(__file__, args, results, tag=args.preset, update=path)
    refs = {k: results[f"{k} bf16"]["tokens_per_s"] for k in ("transformers", "torchtitan-compiled")
            if f"{k} bf16" in results}
    print(f"\n{'mode':<26}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}" + "".join(f"{'vs ' + k:>24}" for k in refs))
    for name, r in results.items():
        r.update({f"over_{k}": r["tokens_per_s"] / v for k, v in refs.items()})
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") else "-"
        print(f"{name:<26}{r['tokens_per_s']:>12,.0f}{100 * (r['mfu'] or 0):>7.1f}%{mem:>10}"
              + "".join(f"{r['tokens_per_s'] / v:>23.2f}x" for v in refs.values()))
    save(__file__, args, results, tag=args.preset, update=path)


if __name__ == "__main__":
    main()
