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

from dsv3.config import ModelConfig
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
