"""Decode throughput of the dsv3 engine next to transformers' `generate` on the same random-weight model.

For each batch size: B requests of `--prompt-len` random tokens, `--new-tokens` greedy tokens each (EOS
ignored). dsv3: the Engine (paged latent cache, absorbed decode through the Triton kernel on CUDA); decode tokens/s
counts only steps in which every sequence decodes (prefill excluded). transformers: `generate` with its default
dynamic cache (its static cache + compile path crashes on this model), whole call timed. Also: the Triton decode
kernel against its torch reference in bf16, and the floor of a batch-1 step: the bytes it reads (weights as stored,
top-k of the routed experts, mean cache) over the measured device copy rate, in bf16 and, with `--fp8-weights`, in
FP8 (the FP8 model is built again with the same weights after the bf16 one is freed).

  python -m benchmarks.infer.decode --preset bench-684m --batches 1,32,128        # an H100
  python -m benchmarks.infer.decode --preset tiny --batches 1,8 --new-tokens 32 --prompt-len 32   # CPU smoke run
  python -m benchmarks.infer.decode --preset deepseek-v2-lite --batches 1 --no-peer --new-tokens 128 --fp8-weights
Results: docs/inference.md#decode-speed; saved as benchmarks/results/infer/decode-<preset>_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from benchmarks.results import save
from dsv3 import Engine, EngineConfig, SamplingParams, preset
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.fp8 import fp8_weights
from dsv3.infer.kv_cache import bytes_per_token
from dsv3.io.hf import build_model
from dsv3.kernels.mla_decode import mla_decode, mla_decode_reference
from dsv3.model.moe import Experts


def kernel_check(device):
    g = torch.Generator().manual_seed(0)
    B, H, C, R, bs = 8, 16, 512, 64, 64
    lens = torch.randint(1, 1500, (B,), generator=g)
    kv = torch.randn(200, bs, C + R, generator=g).to(device, torch.bfloat16)
    tables = torch.randperm(200, generator=g)[: B * 24].view(B, 24).to(device)
    q_c, q_pe = (torch.randn(B, H, d, generator=g).to(device, torch.bfloat16) for d in (C, R))
    ours = mla_decode(q_c, q_pe, kv, tables, lens.to(device), 0.1)
    ref = mla_decode_reference(q_c.double(), q_pe.double(), kv.double(), tables, lens.to(device), 0.1)
    errs = {"mla_decode": ((ours.double() - ref).norm() / ref.norm()).item()}
    # The routed experts' decode kernels (bench-684m's shapes) against the grouped path in float64 on the CPU.
    experts = Experts(preset("bench-684m"))
    experts.gate_up_proj.data.normal_(0, 0.03, generator=g)
    experts.down_proj.data.normal_(0, 0.06, generator=g)
    for N in (1, 32):
        x = torch.randn(N, experts.gate_up_proj.shape[2], generator=g)
        idx = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(N)])
        w = torch.rand(N, 6, generator=g)
        with torch.no_grad():
            ref = experts.cpu().double()(x.double(), w.double(), idx)[0]
            ours = experts.to(device, torch.bfloat16)(x.to(device, torch.bfloat16), w.to(device), idx.to(device))[0]
        errs[f"moe_decode_{N}_rows"] = ((ours.cpu().double() - ref).norm() / ref.norm()).item()
    return errs


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)  # bytes read + written per second


def step_read_bytes(model, cfg, cache_dtype, args) -> int:
    """The bytes a batch-1 decode step must read: every weight and scale as stored (bf16 or e4m3 + fp32 scales),
    of the routed experts only the top-k, of the embedding one row (none of MTP), plus the mean cache."""
    n = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("mtp."):
            continue
        size = t.numel() * t.element_size()
        if name.startswith("embed_tokens."):
            size //= t.shape[0]
        elif ".experts." in name:
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        n += size
    return n + bytes_per_token(cfg, cache_dtype) * (args.prompt_len + args.new_tokens // 2)


def batch1_floor(model, cfg, args, dtype, bw) -> float:
    """The fastest a batch-1 step could be, in ms: its read bytes over the copy rate. A copy's rate counts the
    bytes read and written, and a step only reads, so the bytes are divided by the copy rate itself."""
    return 1e3 * step_read_bytes(model, cfg, dtype, args) / bw


def build(cfg, args, device, dtype):
    """The random-weight model, the same every call (seed 0). Built on the device in its dtype: deepseek-v2-lite's
    15.7B parameters would not fit in fp32 beside bf16."""
    torch.manual_seed(0)
    model = build_model(cfg if args.spec else cfg.replace(num_nextn_predict_layers=0), device, dtype)
    model.init_weights()
    return model.eval()


def run_ours(model, tok, prompts, new_tokens, spec):
    engine = Engine(model, tok, EngineConfig(max_num_seqs=len(prompts), speculative_tokens=spec))
    engine.warmup()  # CUDA graphs recorded before the clock starts
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    # No device sync per step: a step returns once its tokens are on the host, and with the engine's overlap the
    # next step is already running then (a sync would serialize the two).
    decode_time, decode_tokens, first, t_all = 0.0, 0, None, time.perf_counter()
    while engine.has_unfinished():
        pure = all(not s.in_prefill for s in engine.scheduler.running) and not engine.scheduler.waiting
        t = time.perf_counter()
        outs = engine.step()
        n = sum(len(c.delta_token_ids) for o in outs for c in o.outputs)
        if pure:
            decode_time += time.perf_counter() - t
            decode_tokens += n
        for o in outs:
            if o.finished and o.request_id == "req-0":
                first = o.outputs[0].token_ids
    total = time.perf_counter() - t_all
    r = {"decode_tokens_per_s": decode_tokens / decode_time, "tokens_per_s": len(prompts) * new_tokens / total,
         "first_tokens": first}
    if spec:
        r["acceptance"] = engine.accepted / max(engine.drafted, 1)
    return r


def run_hf(model_cfg, state, prompts, new_tokens, device):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    d = model_cfg.to_hf_dict()
    d.pop("moe_layer_freq", None)
    cfg = DeepseekV3Config(**d)
    cfg._attn_implementation = "sdpa"
    hf = DeepseekV3ForCausalLM(cfg).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    missing, unexpected = hf.load_state_dict({(k if k == "lm_head.weight" else f"model.{k}"): v
                                              for k, v in state.items()}, strict=False)
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        hf.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        sync()
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          attention_mask=torch.ones_like(ids))
        sync()
    return {"tokens_per_s": len(prompts) * new_tokens / (time.perf_counter() - t),
            "first_tokens": out[0, ids.shape[1]:].tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--batches", default="1,32,128", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per request")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also time transformers")
    p.add_argument("--spec", type=int, default=0, help="MTP speculative tokens (needs the preset's MTP module)")
    p.add_argument("--fp8-weights", action="store_true",
                   help="then the same model with its decoder weights in FP8 (dsv3/fp8/inference.py)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = train_bpe(read_documents(None), 1024)  # detokenization only: prompts are random ids
    cfg = preset(args.preset)
    model = build(cfg, args, device, dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    results = {"kernel_rel_err_bf16": kernel_check(device) if device == "cuda" else None}
    bw = copy_bandwidth(device) if device == "cuda" else None
    if bw:
        results |= {"copy_bandwidth_GBps": bw / 1e9, "batch1_floor_ms": batch1_floor(model, cfg, args, dtype, bw)}
    g = torch.Generator().manual_seed(1)
    batches = {int(b): torch.randint(2, tok.vocab_size, (int(b), args.prompt_len), generator=g).tolist()
               for b in args.batches.split(",")}
    for B, prompts in batches.items():
        r = {"dsv3": run_ours(model, tok, prompts, args.new_tokens, args.spec)}
        if args.peer:
            r["transformers"] = run_hf(cfg, state, prompts, args.new_tokens, device)
            a, b = r["dsv3"].pop("first_tokens"), r["transformers"].pop("first_tokens")
            r["greedy_agreement_tokens"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            r["speedup"] = r["dsv3"]["tokens_per_s"] / r["transformers"]["tokens_per_s"]
        else:
            r["dsv3"].pop("first_tokens")
        results[f"batch_{B}"] = r
        print(f"batch {B}: {json.dumps(r)}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.fp8_weights:
        # The same weights built again and converted before any engine (e4m3 decoder weights: half the bytes a step
        # reads), once the bf16 model, its engines and the peer's state are gone: both would not fit 80 GB at
        # deepseek-v2-lite.
        del model, state
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        model = build(cfg, args, device, dtype)
        results["fp8_weights"] = fp8_weights(model)
        if bw:
            results["batch1_floor_fp8_ms"] = batch1_floor(model, cfg, args, dtype, bw)
        for B, prompts in batches.items():
            r = run_ours(model, tok, prompts, args.new_tokens, args.spec)
            r.pop("first_tokens")
            r["over_bf16"] = r["decode_tokens_per_s"] / results[f"batch_{B}"]["dsv3"]["decode_tokens_per_s"]
            results[f"batch_{B}"]["dsv3_fp8_weights"] = r
            print(f"batch {B}, FP8 weights: {json.dumps(r)}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if bw and "batch_1" in results:
        ms = 1e3 / results["batch_1"]["dsv3"]["decode_tokens_per_s"]
        results |= {"batch1_step_ms": ms, "batch1_bandwidth_utilisation": results["batch1_floor_ms"] / ms}
        if "dsv3_fp8_weights" in results["batch_1"]:
            ms = 1e3 / results["batch_1"]["dsv3_fp8_weights"]["decode_tokens_per_s"]
            results |= {"batch1_fp8_step_ms": ms,
                        "batch1_fp8_bandwidth_utilisation": results["batch1_floor_fp8_ms"] / ms}
    print(json.dumps(results, indent=2))
    save(__file__, args, results, tag=args.preset)


if __name__ == "__main__":
    main()
