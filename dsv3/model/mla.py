"""Multi-head Latent Attention (SPEC §4): low-rank q, joint kv compression, a decoupled RoPE key shared by heads.

Two paths, side by side as in the paper:
  - expanded (training, full sequences): up-project c_kv to per-head K/V and call scaled_dot_product_attention;
  - with a PagedKV cache (inference): prefill chunks up-project their cached prefix and use SDPA like training;
    decode tokens attend over the cached latent directly, W_UK folded into the query and W_UV applied after
    attention, so K/V are never expanded (absorbed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from dsv3.config import ModelConfig
from dsv3.kernels.mla_decode import mla_decode
from dsv3.model.cache import ABSORBED_MAX_QUERY, PagedKV
from dsv3.model.fuse import fuse_rows
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


# Whole prompts share one SDPA call up to this many tokens: a (T, T) mask costs T² where a call per prompt costs the
# sum of squares (2048 tokens of ~10 prompts: 13 ms per layer packed on a CPU); short chat turns gain the most.
PROMPT_PACK_TOKENS = 256


def _packs(spans: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """Consecutive (start, end) spans grouped while a group's total length stays within `limit` (a longer span
    is a group of its own)."""
    packs, size = [], limit + 1
    for s0, s1 in spans:
        if size + s1 - s0 > limit:
            packs.append([])
            size = 0
        packs[-1].append((s0, s1))
        size += s1 - s0
    return packs


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # index of this layer's pool in a PagedKV
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
        self.fused_a: torch.Tensor | None = None  # set by fuse_projections()

    @property
    def _q_first(self) -> nn.Linear:
        """The query's projection of x (q_proj, or q_a_proj before the low-rank norm and q_b): it and kv_a take x."""
        return self.q_proj if hasattr(self, "q_proj") else self.q_a_proj

    def _project(self, x, cos, sin):
        """-> q_nope (..., H, Dn), roped q_pe (..., H, Dr), normed c_kv (..., C), roped k_pe (..., Dr)."""
        if self.fused_a is not None and not torch.is_grad_enabled():
            q, kv = F.linear(x, self.fused_a).split((self._q_first.out_features, self.c + self.dr), dim=-1)
        else:
            q, kv = self._q_first(x), self.kv_a_proj_with_mqa(x)
        if hasattr(self, "q_b_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.unflatten(-1, (self.n_heads, self.dn + self.dr)).split((self.dn, self.dr), dim=-1)
        c_kv, k_pe = kv.split((self.c, self.dr), dim=-1)
        return (q_nope, apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave),  # rope: all heads
                self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleave))

    def fuse_projections(self) -> None:
        """Inference: the two projections of x (q_a or q, and kv_a) as one GEMM (see `fuse_rows`)."""
        if self._q_first.bias is None and self.kv_a_proj_with_mqa.bias is None:
            self.fused_a = fuse_rows(self.fused_a, self._q_first, self.kv_a_proj_with_mqa)

    def forward(self, x, cos, sin, mask=None, cache: PagedKV | None = None):
        """x (B, T, D) with cos/sin (B, T, Dr/2); or, with a cache, x (T, D) flattened with cos/sin (T, Dr/2).

        mask: None for plain causal attention, or a bool (B, 1, T, T) mask (True = attend) for packed documents.
        """
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        if cache is None:
            o = self._expanded(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            cache.write(self.layer_idx, c_kv, k_pe)
            o = self._paged(q_nope, q_pe, cache, c_kv, k_pe)
        return self.o_proj(o.flatten(-2))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, self.dn + self.dv)).split((self.dn, self.dv), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.dr)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # (B, H, T, Dv)
        # V's head dim differs from Q/K's. On Hopper SDPA's cuDNN backend takes that as is (faster than padding V
        # for flash attention: 1.22 vs 1.47 ms per layer at bench-684m, forward + backward). On a CPU only the
        # flash kernel handles masks without materializing the (T, T) scores, and it wants V padded to Q's width
        # (tiny, 16 x 256: 22 vs 33 ms per layer, forward + backward).
        pad = q.shape[-1] - self.dv if q.device.type == "cpu" else 0
        v = F.pad(v, (0, pad)) if pad > 0 else v
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o[..., :self.dv].transpose(1, 2)  # (B, T, H, Dv)

    def _paged(self, q_nope, q_pe, cache: PagedKV, c_kv, k_pe):
        """Attention of the flat batch's new tokens over their sequences' cached latents: (T, H, Dv).

        Prefill chunks take the expanded path over their cached prefix; decode tokens and speculative
        verification rows (a few new tokens) are batched, one row per token, through the absorbed path.
        """
        if cache.row_lens is not None:  # a decode step: every token is an absorbed row
            return self._absorbed(q_nope, q_pe, cache.kv[self.layer_idx], cache.block_tables, cache.row_lens)
        out = q_nope.new_empty(*q_nope.shape[:2], self.dv)
        spans = [(b, s0, s1) for b, (s0, s1) in enumerate(zip(cache.query_start, cache.query_start[1:]))
                 if s1 - s0 > ABSORBED_MAX_QUERY]
        # On a CPU, whole prompts (nothing cached before them: their new latents are all their keys, c_kv and
        # k_pe as written) need no gather from the pool, and short ones share an SDPA call (see _prompts).
        cpu = q_nope.device.type == "cpu"
        whole = {b for b, s0, s1 in spans if cpu and cache.seq_lens[b] == s1 - s0}
        for pack in _packs([(s0, s1) for b, s0, s1 in spans if b in whole], PROMPT_PACK_TOKENS):
            rows = torch.cat([torch.arange(s0, s1) for s0, s1 in pack]).to(q_nope.device)
            out[rows] = self._prompts(q_nope[rows], q_pe[rows], c_kv[rows], k_pe[rows], [s1 - s0 for s0, s1 in pack])
        for b, s0, s1 in spans:
            if b not in whole:
                out[s0:s1] = self._prefill(q_nope[s0:s1], q_pe[s0:s1], cache.gather(self.layer_idx, b))
        if cache.decode:
            rows = cache.decode_rows
            out[rows] = self._absorbed(q_nope[rows], q_pe[rows], cache.kv[self.layer_idx], cache.decode_tables,
                                       cache.decode_lens)
        return out

    def _prefill(self, q_nope, q_pe, lat_SL):
        """Tb new tokens (the last Tb of the S cached ones) attend causally over all S: expanded K/V, SDPA."""
        Tb, H, S = q_nope.shape[0], self.n_heads, lat_SL.shape[0]
        lat_SL = lat_SL.to(q_nope.dtype)
        c_kv, k_pe = lat_SL[:, : self.c], lat_SL[:, self.c:]
        k_nope, v = self.kv_b_proj(c_kv).unflatten(-1, (H, self.dn + self.dv)).split((self.dn, self.dv), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)[None]  # (1, H, Tb, Dn+Dr)
        k = torch.cat((k_nope, k_pe[:, None].expand(S, H, self.dr)), dim=-1).transpose(0, 1)[None]  # (1, H, S, .)
        # New token i sits at cache position S - Tb + i and sees keys up to there: causal, aligned bottom-right.
        # As a CausalBias (not a bool mask) on 4-d inputs (SDPA's fused kernels take no other) SDPA runs its
        # fused kernels on a GPU; else its fp32 math path (bench-684m, 2048 new tokens over 8K: 6.9 ms a layer).
        o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1)[None], attn_mask=causal_lower_right(Tb, S),
                                           scale=self.scale)
        return o[0].transpose(0, 1)  # (Tb, H, Dv)

    def _prompts(self, q_nope, q_pe, c_kv, k_pe, lens: list[int]):
        """Whole prompts packed back to back (T tokens, `lens` each), each attending causally over itself:
        _expanded's attention, under a packed-document mask when there are several. (T, H, Dv)"""
        mask = None  # one prompt: plain causal
        if len(lens) > 1:
            doc = torch.repeat_interleave(torch.arange(len(lens), device=c_kv.device),
                                          torch.tensor(lens, device=c_kv.device))
            mask = (doc[:, None] == doc[None]).tril()[None, None]  # (1, 1, T, T): same prompt, not the future
        o = self._expanded(q_nope[None], q_pe[None], c_kv[None].to(q_nope.dtype), k_pe[None].to(q_nope.dtype), mask)
        return o[0]

    def _absorbed(self, q_nope, q_pe, kv, block_tables, lens):
        """One row per new token, each over its own prefix of its sequence's cached latents: W_UK folded into
        the query, W_UV applied after attention (SPEC §4.4), so per-head K/V are never formed. (B, H, Dv)"""
        H = self.n_heads
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.c)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]  # (H, Dn, C), (H, Dv, C)
        q_c = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)  # (B, H, C)
        o_c = mla_decode(q_c, q_pe, kv, block_tables, lens, self.scale)  # (B, H, C)
        return torch.einsum("bhc,hvc->bhv", o_c, w_uv)
