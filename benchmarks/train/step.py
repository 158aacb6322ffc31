"""Training-step throughput of dsv3 vs. transformers' DeepseekV3ForCausalLM on the same config.

One step = forward (MTP off) + cross-entropy on the next token (computed in fp32; each model with its own
project's loss: dsv3's chunked one, transformers' `F.cross_entropy(logits.float())`) + backward + AdamW step, on
random token ids (fixed seed, the same batches for both models). The peer starts from a copy of our initial weights, so
both models route the same tokens to the same experts (and the first losses should agree). Each model is timed
in its own loop after `--warmup` untimed steps; reported: tokens/s, ms/step, peak memory (CUDA: max allocated,
reset per model; CPU: the process's max RSS so far, which only grows) and, on CUDA, MFU against the GPU's
dense bf16 peak (dsv3.train.metrics.peak_flops) with dsv3.info's training FLOPs/token (6·N_active + 6·L·H·(Dqk + Dv)·T, causal).

  python -m benchmarks.train.step --preset tiny --steps 5 --warmup 2                  # CPU, fp32, 4 x 256
  python -m benchmarks.train.step --preset tiny --batch-size 16 --dtype amp            # CPU, bf16 autocast
  python -m benchmarks.train.step --preset bench-684m --batch-size 8 --seq-len 2048   # CUDA, bf16
Results: docs/training.md; saved as benchmarks/results/train/step-<preset>[-amp]_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
import time

import torch
import torch.nn.functional as F

from benchmarks.results import device_name, save
from dsv3 import Transformer, preset
from dsv3.info import model_stats
from dsv3.runtime import keep_freed_memory
from dsv3.train.metrics import peak_flops
from dsv3.train.objective import next_token_loss



def parse_args():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m" if cuda else "tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch-size", type=int, default=8 if cuda else 4)
    p.add_argument("--seq-len", type=int, default=2048 if cuda else 256)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--dtype", choices=("bf16", "fp32", "amp"), default=None,
                   help="parameters in bf16 or fp32, or amp: fp32 parameters under bf16 autocast, for both models "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' DeepseekV3ForCausalLM")
    p.add_argument("--ours", default=None,
                   help="comma-separated modes to time ours in: eager, compiled (torch.compile of the whole model); "
                        "default: eager,compiled on CUDA, eager on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared box)")
    p.add_argument("--rounds", type=int, default=None,
                   help="time every model this many times, alternating, and keep each one's best round "
                        "(default 2 on CPU, where whichever model runs first also pays for warming oneDNN's "
                        "per-shape kernels; 1 on CUDA)")
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.ours = (args.ours or ("eager,compiled" if args.device == "cuda" else "eager")).split(",")
    args.rounds = args.rounds or (1 if args.device == "cuda" else 2)
    return args


def build_ours(cfg, device, dtype, compile_, keep_init):
    model = Transformer(cfg).to(device)
    model.init_weights()
    model = model.to(dtype)
    init_sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if keep_init else None
    fwd = torch.compile(model) if compile_ else model
    return model, (lambda ids: next_token_loss(fwd(ids[:, :-1], mtp=False).logits, ids[:, 1:])), init_sd


def build_peer(cfg, device, dtype, init_sd):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # a test oracle (dev extra): only with the peer
    d = cfg.to_hf_dict()
    while True:  # drop any key this transformers version rejects
        try:
            hf_cfg = DeepseekV3Config(**d)
            break
        except TypeError as e:
            bad = next((k for k in d if f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            print(f"  DeepseekV3Config rejects {bad!r}: dropped")
            d.pop(bad)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"  # transformers 5: integrations/moe.py ExpertsInterface
    model = DeepseekV3ForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    # Same names as ours below `model.` (stacked experts included): start from our initial weights.
    missing, unexpected = model.load_state_dict(
        {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in init_sd.items()}, strict=False)
    # transformers' V3 router always has a selection bias; a V2-style (greedy, softmax) config has none: zeros.
    if unexpected or any(not k.endswith("e_score_correction_bias") for k in missing):
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    impl = {"attn": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", "n/a")}
    def loss(ids):  # what transformers' ForCausalLMLoss computes: fp32 logits, mean cross-entropy
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return model, loss, impl


def peak_memory(device) -> float:
    """GiB: CUDA max allocated since the last reset; CPU max RSS of the process so far."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_model(name, model, loss_fn, batches, args):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=args.device == "cuda")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    losses = []

    def step(ids):
        with torch.autocast(args.device, torch.bfloat16, enabled=getattr(args, "dtype", None) == "amp"):
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i, ids in enumerate(batches[: args.warmup]):
        t0 = time.perf_counter()
        losses.append(step(ids).item())
        print(f"  {name} warmup {i + 1}/{args.warmup}: loss {losses[-1]:.4f}, {time.perf_counter() - t0:.2f} s")
    sync()
    t0 = time.perf_counter()
    timed = [step(ids) for ids in batches[args.warmup:]]  # no .item() inside: no host sync per step
    sync()
    elapsed = time.perf_counter() - t0
    losses += [t.item() for t in timed]
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"  {name}: {args.steps} steps in {elapsed:.2f} s, last loss {losses[-1]:.4f}")
    return {"tokens_per_s": tokens / elapsed, "ms_per_step": 1e3 * elapsed / args.steps,
            "peak_mem_gib": peak_memory(args.device), "first_loss": losses[0], "last_loss": losses[-1]}


def _keep_best(results, name, r):
    if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
        results[name] = r


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}[args.dtype]
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)
    stats = model_stats(cfg, args.seq_len)
    flops_per_token = stats["training_flops_per_token"]
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
               for _ in range(args.warmup + args.steps)]
    torch.manual_seed(args.seed)
    print(f"{args.preset}: {stats['total_params'] / 1e6:.1f}M params, {stats['active_params'] / 1e6:.1f}M active; "
          f"batch {args.batch_size} x {args.seq_len}, {args.dtype} on {device}, {torch.get_num_threads()} threads")

    if device == "cpu":
        keep_freed_memory()  # as `dsv3 train` does on CPU; it applies to both models alike
    results, impl, init_sd = {}, None, None
    for _ in range(args.rounds):
        for mode in args.ours:
            free(device)
            model, forward, sd = build_ours(cfg, device, dtype, mode == "compiled", True)
            init_sd = init_sd or sd
            _keep_best(results, f"dsv3 ({mode})", time_model(f"dsv3 {mode}", model, forward, batches, args))
            del model, forward, sd
        free(device)
        if args.peer:
            model, forward, impl = build_peer(cfg, device, dtype, init_sd)
            print(f"  transformers: attn={impl['attn']}, experts={impl['experts']}")
            _keep_best(results, "transformers", time_model("transformers", model, forward, batches, args))
            del model, forward
            free(device)
    del init_sd

    peer = results.get("transformers")
    for r in results.values():
        peak = peak_flops(torch.device(device))
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak if peak else None
        r["over_transformers"] = r["tokens_per_s"] / peer["tokens_per_s"] if peer else None
    mem = "peak alloc GiB" if device == "cuda" else "max RSS GiB"
    print(f"\n{'model':<20}{'tokens/s':>12}{'ms/step':>10}{mem:>16}{'MFU':>8}{'vs HF':>9}{'loss0':>9}")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['over_transformers']:.2f}x" if r["over_transformers"] else "-"
        print(f"{name:<20}{r['tokens_per_s']:>12,.0f}{r['ms_per_step']:>10.1f}{r['peak_mem_gib']:>16.2f}{mfu:>8}"
              f"{ratio:>9}{r['first_loss']:>9.4f}")

    versions = {"python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if args.peer:
        import transformers  # a test oracle (the dev extra), needed only with the peer
        versions["transformers"] = transformers.__version__
    save(__file__, args, {"models": results, "training_flops_per_token": flops_per_token, "peer_impl": impl,
                          "config": cfg.to_hf_dict(), **versions},
         tag=args.preset + ("-amp" if args.dtype == "amp" else ""), device=device_name(device))


if __name__ == "__main__":
    main()
