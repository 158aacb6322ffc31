"""Multi-head Latent Attention (DeepSeek-V3 report §2.1.1; docs/architecture.md#multi-head-latent-attention):
low-rank queries, a joint kv compression c_kv, and a decoupled RoPE key k_pe shared by all heads.

    c_q = RMSNorm(x · W_DQ)      q = c_q · W_UQ  -> per head [q_nope ; q_pe], RoPE on q_pe
    [c_kv ; k_pe] = x · W_DKV    c_kv normed; k_pe roped, one for all heads
    K_h = [c_kv · W_UK_h ; k_pe]    V_h = c_kv · W_UV_h            (kv_b_proj holds [W_UK_h ; W_UV_h] per head)

The same attention, two ways (docs/architecture.md#absorbed-attention):
  - expanded (`_expanded`, what training runs): up-project c_kv to per-head K / V, then scaled dot-product attention;
  - absorbed (`_absorbed`): q_nope · K_nope_hᵀ = (q_nope · W_UK_h) · c_kvᵀ, so W_UK folds into the query and W_UV
    applies after attention; every head attends over the shared (C + Dr)-wide latent rows, never expanded.
The inference engine runs the absorbed form over its paged latent cache (dsv3/infer/attention.py).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels.attention import attention
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # index of this layer's pool in the engine's paged cache
        self.n_heads, self.interleave = cfg.num_attention_heads, cfg.rope_interleave
        self.dn, self.dr, self.dv, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        H, D, bias = self.n_heads, cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (self.dn + self.dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (self.dn + self.dr), bias=False)
        # One projection makes both the kv latent (first C rows) and the shared rope key (last Dr rows).
        self.kv_a_proj_with_mqa = nn.Linear(D, self.c + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.c, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.c, H * (self.dn + self.dv), bias=False)  # head-major [W_UK_h; W_UV_h]
        self.o_proj = nn.Linear(H * self.dv, D, bias=bias)

    @property
    def _q_first(self) -> nn.Linear:
        """The query's projection of x (q_proj, or q_a_proj before the low-rank norm and q_b): it and kv_a take x."""
        return self.q_proj if hasattr(self, "q_proj") else self.q_a_proj

    def _compress(self, x):
        """x's two projections: the query's first (see `_q_first`) and the joint kv compression (C + Dr)."""
        return self._q_first(x), self.kv_a_proj_with_mqa(x)

    def _project(self, x, cos, sin):
        """-> q_nope (..., H, Dn), roped q_pe (..., H, Dr), normed c_kv (..., C), roped k_pe (..., Dr)."""
        q, kv = self._compress(x)
        if hasattr(self, "q_b_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, self.dn + self.dr)).split((self.dn, self.dr), dim=-1)
        c_kv, k_pe = kv.split((self.c, self.dr), dim=-1)
        return (q_nope, apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave),  # rope: all heads
                self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleave))

    def forward(self, x, cos, sin, mask=None, cache=None):
        """x (B, T, D) with cos/sin (B, T, Dr/2) -> (B, T, D).

        mask: None for plain causal attention, or a bool (B, 1, T, T) mask (True = attend) for packed documents.
        cache: the engine's paged latent cache, attended over only by the engine's MLA (dsv3/infer/attention.py).
        """
        if cache is not None:
            raise ValueError("attention over a paged cache runs in the engine's MLA: prepare the model with "
                             "dsv3.infer.transform.prepare_for_engine(model)")
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        return self.o_proj(self._expanded(q_nope, q_pe, c_kv, k_pe, mask).flatten(-2))

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's per-head up-projections W_UK (H, Dn, C) and W_UV (H, Dv, C)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.c)
        return w[:, : self.dn], w[:, self.dn:]

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Naive MLA: per-head K / V up-projected from c_kv, the rope key broadcast over heads. (B, T, H, Dv)"""
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, self.dn + self.dv)).split((self.dn, self.dv), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.dr)), dim=-1).transpose(1, 2)
        o = attention(q, k, v.transpose(1, 2), mask, self.scale)  # (B, H, T, Dv)
        return o.transpose(1, 2)  # (B, T, H, Dv)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Absorbed MLA, the same attention as `_expanded`: W_UK folded into the query, W_UV applied after
        attention; every head attends over the shared latent rows [c_kv ; k_pe]. (B, T, H, Dv)"""
        w_uk, w_uv = self._w_uk_uv()
        q_c = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        scores = (torch.einsum("bthc,bsc->bhts", q_c, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.scale
        T, S = scores.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril() if mask is None else mask
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in fp32 at least
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(q_c.dtype)  # (B, H, T, S)
        o_c = torch.einsum("bhts,bsc->bthc", p, c_kv)  # (B, T, H, C)
        return torch.einsum("bthc,hvc->bthv", o_c, w_uv)
