"""`dsv3 info`: sizes of a configuration, counted on the meta device (nothing is allocated).

Conventions, stated in every report:
  - total parameters: every stored tensor, once; "with MTP" adds the MTP modules' own tensors (they share the
    embedding and head with the main model, so those are not counted twice);
  - activated parameters per token: everything a token touches (its K routed experts, not the other E−K),
    with and without the embedding lookup (a gather, no FLOPs); the output head is counted in both;
  - FLOPs per token: 2·N_active(without embedding) for the matmuls plus causal attention
    2·L·H·(Dqk + Dv)·T/2·2 at context T (forward); training is 3× forward.
"""
from __future__ import annotations

import json
import math

from dsv3.config import ModelConfig
from dsv3.infer import tensor_parallel as tp_layout
from dsv3.io.hf import build_model


def model_stats(cfg: ModelConfig, seq_len: int = 4096) -> dict:
    model = build_model(cfg, device="meta")
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    main = numel(model) - numel(model.mtp)
    embed = model.embed_tokens.weight.numel()
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle_experts = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    active = main - idle_experts
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    attn_fwd = 2 * L * H * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len  # QK^T and PV, causal half, ×2 FLOPs/MAC
    fwd = 2 * (active - embed) + attn_fwd
    return {
        "model_type": cfg.model_type,
        "total_params": main,
        "total_params_with_mtp": numel(model),
        "mtp_params": numel(model.mtp),
        "active_params": active,
        "active_params_without_embedding": active - embed,
        "kv_cache_bytes_per_token": L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2,
        "mha_kv_cache_bytes_per_token": L * H * (cfg.qk_head_dim + cfg.v_head_dim) * 2,
        "seq_len": seq_len,
        "forward_flops_per_token": fwd,
        "training_flops_per_token": 3 * fwd,
        "conventions": {
            "total_params": "main model, embedding and head once, without MTP",
            "total_params_with_mtp": "plus MTP modules; their embedding/head are shared, not counted again",
            "active_params": "per token, counting the embedding and the output head",
            "active_params_without_embedding": "per token, output head counted, embedding lookup not",
            "kv_cache_bytes_per_token": "bf16 MLA latent (kv_lora_rank + qk_rope_head_dim) per layer, main layers",
            "mha_kv_cache_bytes_per_token": "bf16 K and V of the same heads as plain multi-head attention",
            "forward_flops_per_token": "2·active(without embedding) + causal attention at seq_len",
        },
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def report(cfg: ModelConfig, seq_len: int = 4096, as_json: bool = False) -> str:
    s = model_stats(cfg, seq_len)
    if as_json:
        return json.dumps(s)
    mla = s["kv_cache_bytes_per_token"]
    mha = s["mha_kv_cache_bytes_per_token"]
    q = "none (q_proj)" if cfg.q_lora_rank is None else cfg.q_lora_rank
    routing = (f"{cfg.n_routed_experts} routed experts of width {cfg.moe_intermediate_size}, "
               f"top-{cfg.num_experts_per_tok}"
               f" ({cfg.scoring_func}, {cfg.topk_method}, groups {cfg.topk_group}/{cfg.n_group}), "
               f"{cfg.n_shared_experts} shared" if cfg.n_routed_experts else "dense")
    lines = [
        f"{cfg.model_type}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
        f"({cfg.first_k_dense_replace} dense of width {cfg.intermediate_size}), {cfg.num_attention_heads} heads, "
        f"vocab {cfg.vocab_size}, MTP depth {cfg.num_nextn_predict_layers}",
        f"MLA: q_lora_rank {q}, kv_lora_rank {cfg.kv_lora_rank}, head dims nope {cfg.qk_nope_head_dim} / rope "
        f"{cfg.qk_rope_head_dim} / v {cfg.v_head_dim}, rope {cfg.rope_type}",
        f"MoE: {routing}",
        f"parameters: {_fmt(s['total_params'])} total without MTP, {_fmt(s['total_params_with_mtp'])} with MTP "
        f"(embedding and head shared)",
        f"activated per token: {_fmt(s['active_params'])} counting the embedding, "
        f"{_fmt(s['active_params_without_embedding'])} without",
        f"KV cache per token (bf16): {mla:,} B MLA latent vs {mha:,} B as multi-head attention ({mha / mla:.1f}×)",
        f"FLOPs per token at context {seq_len}: {_fmt(s['forward_flops_per_token'])} forward, "
        f"{_fmt(s['training_flops_per_token'])} training",
    ]
    return "\n".join(lines)


# ---- memory plan of tensor-parallel serving ---------------------------------------------------------------------
RESERVE_GB = 6.0  # per GPU, beside weights and cache: one prefill chunk's activations, CUDA graphs, NCCL buffers,
# allocator slack


def memory_plan(cfg: ModelConfig, tp: int = 1, gpu_memory_gb: float | None = None, fp8_weights: bool = False,
                reserve_gb: float | None = None, dtype_bytes: int = 2) -> dict:
    """What one of `tp` ranks holds when the model is served in DeepSeek's tensor-parallel layout
    (dsv3/infer/tensor_parallel.py), and whether it fits a card of `gpu_memory_gb` × 10⁹ bytes. Weights: MTP
    included when the model has it; with `fp8_weights`, the tensors DeepSeek stores in FP8 (those fp8_weights()
    converts) at one byte plus an fp32 scale per 128×128 block of each rank's slice, the rest bf16 (`dtype_bytes`
    4: fp32; the routing bias fp32). Cache: the bf16 latent of every layer (MTP's too), the same on every rank. `fits`: weights, the
    reserve and one sequence of the whole context fit the card. Raises ValueError naming what does not split."""
    model = build_model(cfg, device="meta")
    shapes = [(n, tuple(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers())
              if n != "rope_inv_freq"]
    fp8 = tp_layout.fp8_held(model) if fp8_weights else set()
    tp_layout.check_divisible(cfg, tp, shapes, fp8)
    counts = {"fp8": 0, "scales": 0, "bf16": 0, "fp32": 0}
    mtp_bytes = 0
    for name, shape in shapes:
        shard = list(shape)
        if (d := tp_layout.split_dim(name)) is not None:
            shard[d] //= tp
        numel = math.prod(shard)
        if name in fp8:  # (..., rows, cols): the scale grid of each matrix, in whole blocks of this rank's slice
            part = {"fp8": numel, "scales": math.prod(shard[:-2]) * -(-shard[-2] // 128) * -(-shard[-1] // 128) * 4}
        elif name.endswith("e_score_correction_bias"):
            part = {"fp32": numel * 4}
        else:
            part = {"bf16" if dtype_bytes == 2 else "fp32": numel * dtype_bytes}
        for k, v in part.items():
            counts[k] += v
            mtp_bytes += v if name.startswith("mtp.") else 0
    weights = sum(counts.values())
    layer_cache = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # bf16 latent + rope key, per token and layer
    plan = {"tp": tp, "fp8_weights": fp8_weights, "dtype": {2: "bf16", 4: "fp32"}[dtype_bytes],
            "weight_bytes_per_rank": weights,
            "weight_bytes_by_kind": counts, "mtp_weight_bytes_per_rank": mtp_bytes,
            "cache_bytes_per_token": cfg.num_hidden_layers * layer_cache,
            "mtp_cache_bytes_per_token": cfg.num_nextn_predict_layers * layer_cache,
            "context_length": cfg.max_position_embeddings,
            "reserve_bytes": int((RESERVE_GB if reserve_gb is None else reserve_gb) * 1e9)}
    if gpu_memory_gb is not None:
        card, per_token = int(gpu_memory_gb * 1e9), plan["cache_bytes_per_token"] + plan["mtp_cache_bytes_per_token"]
        free = card - weights - plan["reserve_bytes"]
        plan |= {"gpu_memory_bytes": card, "cache_tokens_fit": max(free, 0) // per_token,
                 "fits": free >= cfg.max_position_embeddings * per_token}
    return plan


def plan_report(plan: dict) -> str:
    gb = lambda b: f"{b / 1e9:,.2f} GB"  # noqa: E731  (10⁹ bytes, as cards are sold)
    kinds = ", ".join(f"{k} {gb(v)}" for k, v in plan["weight_bytes_by_kind"].items() if v)
    kind = f"FP8 weights (the rest {plan['dtype']})" if plan["fp8_weights"] else f"{plan['dtype']} weights"
    lines = [f"tensor parallel over {plan['tp']} rank(s), {kind}:",
             f"  weights per rank: {gb(plan['weight_bytes_per_rank'])} ({kinds}; MTP "
             f"{gb(plan['mtp_weight_bytes_per_rank'])})",
             f"  latent cache, the same on every rank: {plan['cache_bytes_per_token']:,} B per token (MTP's layer "
             f"{plan['mtp_cache_bytes_per_token']:,} B more); a full context of {plan['context_length']:,} tokens is "
             f"{gb((plan['cache_bytes_per_token'] + plan['mtp_cache_bytes_per_token']) * plan['context_length'])}",
             f"  reserve per GPU (activations, CUDA graphs, NCCL buffers, allocator slack): "
             f"{gb(plan['reserve_bytes'])}"]
    if "gpu_memory_bytes" in plan:
        lines.append(f"  on a {gb(plan['gpu_memory_bytes'])} card: {plan['cache_tokens_fit']:,} tokens of cache fit; "
                     + ("fits" if plan["fits"] else "DOES NOT FIT (weights + reserve + one full-context sequence)"))
    return "\n".join(lines)


def refuse_unless_fits(cfg: ModelConfig, gpu_memory_bytes: int, fp8_weights: bool, dtype_bytes: int = 2) -> dict:
    """The plan on this card; SystemExit with it, before anything loads, when it does not fit."""
    plan = memory_plan(cfg, 1, gpu_memory_bytes / 1e9, fp8_weights, dtype_bytes=dtype_bytes)
    if not plan["fits"]:
        raise SystemExit(f"the model does not fit this GPU; nothing was loaded:\n{plan_report(plan)}")
    return plan
