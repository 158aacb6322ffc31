"""The engine's MLA: the model's attention (dsv3/model/mla.py), plus attention over the paged latent cache.

`prepare_for_engine` (transform.py) swaps every MLA of a built model for `PagedMLA`; parameters, their names and
the training path stay the model's. With a PagedKV (paged_kv.py) each forward writes its new tokens' latents into
the pool, then:
  - decode tokens and speculative verification rows (a few new tokens) run absorbed
    (docs/architecture.md#absorbed-attention), one row per token over its own prefix of the cached latents, through
    the mla_decode kernel: per-head K / V are never formed;
  - prefill chunks up-project their cached prefix and attend causally over it, as training does;
  - on a CPU, whole prompts (nothing cached before them) take their keys from the new latents as written, and short
    ones share one attention call under a packed-prompt mask.
Without autograd, the two projections of x run as one GEMM over `fused_a` (transform.py: `fuse_rows`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from dsv3.infer.paged_kv import ABSORBED_MAX_QUERY, PagedKV
from dsv3.kernels.mla_decode import mla_decode
from dsv3.model.mla import MLA

# Whole prompts share one attention call up to this many tokens: a (T, T) mask costs T² where a call per prompt
# costs the sum of squares (measured on a CPU: docs/inference.md#cpu-engine); short chat turns gain the most.
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


class PagedMLA(MLA):
    fused_a: torch.Tensor | None = None  # [q's first projection ; kv_a] rows, sharing their weights' memory

    def _compress(self, x):
        if self.fused_a is not None and not torch.is_grad_enabled():
            return F.linear(x, self.fused_a).split((self._q_first.out_features, self.c + self.dr), dim=-1)
        return super()._compress(x)

    def forward(self, x, cos, sin, mask=None, cache: PagedKV | None = None):
        """Without a cache: the model's MLA. With one: x (T, D) flattened over sequences, cos/sin (T, Dr/2)."""
        if cache is None:
            return super().forward(x, cos, sin, mask)
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        cache.write(self.layer_idx, c_kv, k_pe)
        return self.o_proj(self._paged(q_nope, q_pe, cache, c_kv, k_pe).flatten(-2))

    def _paged(self, q_nope, q_pe, cache: PagedKV, c_kv, k_pe):
        """Attention of the flat batch's new tokens over their sequences' cached latents: (T, H, Dv).

        Prefill chunks take the expanded path over their cached prefix; decode tokens and speculative
        verification rows (a few new tokens) are batched, one row per token, through the absorbed path.
        """
        if cache.row_lens is not None:  # a decode step: every token is an absorbed row
            return self._absorbed_rows(q_nope, q_pe, cache.kv[self.layer_idx], cache.block_tables, cache.row_lens)
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
            out[rows] = self._absorbed_rows(q_nope[rows], q_pe[rows], cache.kv[self.layer_idx], cache.decode_tables,
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
        # fused kernels on a GPU; else its fp32 math path (measured: docs/inference.md#engine).
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

    def _absorbed_rows(self, q_nope, q_pe, kv, block_tables, lens):
        """`MLA._absorbed` for one row per new token, each over its own prefix of its sequence's cached latents
        (block table, length), read from the pool by the mla_decode kernel. (B, H, Dv)"""
        w_uk, w_uv = self._w_uk_uv()  # (H, Dn, C), (H, Dv, C)
        q_c = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)  # (B, H, C)
        o_c = mla_decode(q_c, q_pe, kv, block_tables, lens, self.scale)  # (B, H, C)
        return torch.einsum("bhc,hvc->bhv", o_c, w_uv)
