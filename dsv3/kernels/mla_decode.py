"""Absorbed MLA decode attention over a paged latent cache (docs/architecture.md#absorbed-attention): one new token
per sequence attends over the S_b cached latents of its sequence, read block by block through its block table.

    scores_bhs = (q_c_bhc · c_kv_bsc + q_pe_bhr · k_pe_bsr) · scale      c_kv / k_pe = the pool rows of seq b
    o_bhc = softmax_s(scores) · c_kv_bsc                                  (W_UV is applied by the caller)

Per-head K/V are never formed: all H heads share the same (C + Dr)-wide latent rows, which is what makes MLA
decode cheap in memory traffic — every cached row is read once per sequence for all heads.

When the batch is small, each sequence's tokens are split over several programs (flash-decoding), each writing a
partial output and its log-sum-exp, merged by a second kernel: at batch 1 a single program would walk the whole
cache alone (measured, with and without splits: docs/inference.md#decode-speed).

`mla_decode` runs the Triton kernel on CUDA tensors (or anywhere under TRITON_INTERPRET=1, which is how CI
tests it on a CPU) and the torch reference otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl


def mla_decode_reference(q_c, q_pe, kv, block_tables, seq_lens, scale, buckets: int = 4):
    """q_c (B, H, C), q_pe (B, H, Dr), kv (blocks, bs, C + Dr), block_tables (B, max_blocks), seq_lens (B,).

    Sequences are gathered and padded in `buckets` groups of similar length, so short ones are not padded to
    the longest of the whole batch (tiny-576, 64 requests of 100-380 tokens: a third less padding)."""
    if q_c.shape[0] < 4 * buckets:
        return _attend(q_c, q_pe, kv, block_tables, seq_lens, scale)
    out = torch.empty_like(q_c)
    for idx in seq_lens.argsort().tensor_split(buckets):
        out[idx] = _attend(q_c[idx], q_pe[idx], kv, block_tables[idx], seq_lens[idx], scale)
    return out


def _attend(q_c, q_pe, kv, block_tables, seq_lens, scale):
    (B, H, C), bs = q_c.shape, kv.shape[1]
    n_blocks = -(-int(seq_lens.max()) // bs)
    # index_select copies whole blocks (faster on a CPU than advanced indexing with the 2-D table).
    lat = kv.index_select(0, block_tables[:, :n_blocks].flatten()).view(B, 1, n_blocks * bs, -1).to(q_c.dtype)
    # Every head attends over the same latent rows (keys q_c·c_kv + q_pe·k_pe against whole rows, values their c_kv
    # part): one head whose H query rows are the heads. SDPA's fused kernel reads the rows once where two bmms and a
    # softmax read them twice (measured on a CPU: docs/inference.md#cpu-engine).
    valid = torch.arange(lat.shape[2], device=lat.device) < seq_lens[:, None]  # (B, S)
    o = F.scaled_dot_product_attention(torch.cat((q_c, q_pe), -1).unsqueeze(1), lat, lat,
                                       attn_mask=valid[:, None, None, :], scale=scale)
    return o[:, 0, :, :C]  # (B, H, C)


if triton is not None:
    @triton.jit
    def _mla_decode_kernel(q_c, q_pe, kv, tables, lens, out, lse, scale, H, C, R, bs,
                           s_qc_b, s_qc_h, s_qp_b, s_qp_h, s_kv_blk, s_kv_tok, s_tab_b, s_o_b, s_o_h, s_o_s,
                           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_R: tl.constexpr, SPLITS: tl.constexpr):
        # One program: BLOCK_H heads of one sequence over split `sp` of its tokens (a contiguous range, a whole
        # number of BLOCK_N), online softmax BLOCK_N tokens at a time. One split: the normalized output. Several:
        # each split's normalized partial output and its log-sum-exp, merged by _mla_combine_kernel.
        b = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        sp = tl.program_id(2)
        c = tl.arange(0, BLOCK_C)
        r = tl.arange(0, BLOCK_R)
        hm = h < H
        qc = tl.load(q_c + b * s_qc_b + h[:, None] * s_qc_h + c[None, :], mask=hm[:, None] & (c[None, :] < C),
                     other=0.0)  # (BLOCK_H, BLOCK_C)
        qp = tl.load(q_pe + b * s_qp_b + h[:, None] * s_qp_h + r[None, :], mask=hm[:, None] & (r[None, :] < R),
                     other=0.0)  # (BLOCK_H, BLOCK_R)
        L = tl.load(lens + b)
        per = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
        start = sp * per
        end = tl.minimum(start + per, L)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        while start < end:  # `while`, not range(0, L, ...): Triton 3.6's interpreter fails on a runtime range
            n = start + tl.arange(0, BLOCK_N)
            nm = n < end
            blk = tl.load(tables + b * s_tab_b + n // bs, mask=nm, other=0)
            row = kv + blk * s_kv_blk + (n % bs) * s_kv_tok  # (BLOCK_N,) pointers to latent rows
            ck = tl.load(row[:, None] + c[None, :], mask=nm[:, None] & (c[None, :] < C), other=0.0)
            kp = tl.load(row[:, None] + C + r[None, :], mask=nm[:, None] & (r[None, :] < R), other=0.0)
            s = tl.dot(qc, tl.trans(ck).to(qc.dtype)) + tl.dot(qp, tl.trans(kp).to(qp.dtype))  # (BLOCK_H, BLOCK_N)
            s = tl.where(nm[None, :], s * scale, float("-inf")).to(tl.float32)  # torch.compile passes scale as fp64
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(ck.dtype), ck).to(tl.float32)
            m_i = m_new
            start += BLOCK_N
        seen = l_i > 0  # a split past the sequence's end saw nothing
        acc = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(out + b * s_o_b + h[:, None] * s_o_h + sp * s_o_s + c[None, :], acc.to(out.dtype.element_ty),
                 mask=hm[:, None] & (c[None, :] < C))
        if SPLITS > 1:
            tl.store(lse + (b * H + h) * SPLITS + sp, tl.where(seen, m_i + tl.log(l_i), float("-inf")), mask=hm)

    @triton.jit
    def _mla_combine_kernel(part, lse, out, H, C, s_o_b, s_o_h, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program: one (sequence, head); the splits' outputs weighted by exp(lse_s − max lse).
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, SPLITS)
        c = tl.arange(0, BLOCK_C)
        lse_s = tl.load(lse + (b * H + h) * SPLITS + s)
        w = tl.exp(lse_s - tl.max(lse_s, 0))  # the first split always saw a token: the max is finite
        o = tl.load(part + ((b * H + h) * SPLITS + s[:, None]) * C + c[None, :], mask=c[None, :] < C, other=0.0)
        o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out + b * s_o_b + h * s_o_h + c, o.to(out.dtype.element_ty), mask=c < C)


def num_splits(batch: int, heads: int, device: torch.device) -> int:
    """Splits of each sequence's tokens so that about two programs per multiprocessor run (flash-decoding): at
    batch 1 one program would walk the whole cache alone. A power of two, 1 to 16."""
    if device.type != "cuda":
        return 1
    programs = batch * triton.cdiv(heads, 16)
    want = 2 * torch.cuda.get_device_properties(device).multi_processor_count / programs
    return 1 << max(0, min(4, int(want).bit_length() - 1))


def mla_decode(q_c, q_pe, kv, block_tables, seq_lens, scale, block_n: int = 32, splits: int | None = None):
    """(B, H, C) attention output over each sequence's cached latents; see the module docstring. `splits`: how
    many programs share one sequence's tokens (default: `num_splits`)."""
    if not use_triton(q_c):
        return mla_decode_reference(q_c, q_pe, kv, block_tables, seq_lens, scale)
    return _mla_decode_triton(q_c, q_pe, kv, block_tables, seq_lens, scale, block_n, splits or 0)


# An opaque op to torch.compile: Inductor neither re-traces the kernel nor, unable to see what it writes, copies
# the whole KV pool around it.
@torch.library.custom_op("dsv3::mla_decode", mutates_args=())
def _mla_decode_triton(q_c: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float, block_n: int, splits: int) -> torch.Tensor:
    B, H, C = q_c.shape
    R = q_pe.shape[-1]
    # Chosen here, on concrete shapes: a torch.compile'd caller would otherwise specialize on the batch size.
    splits = splits or num_splits(B, H, q_c.device)
    # Strided rows are fine (a copy is a kernel more per layer in a decode step); the last dim must be dense.
    q_c = q_c if q_c.stride(-1) == 1 else q_c.contiguous()
    q_pe = q_pe.to(q_c.dtype) if q_pe.stride(-1) == 1 else q_pe.contiguous().to(q_c.dtype)
    kv = kv.to(q_c.dtype) if kv.dtype != q_c.dtype else kv
    tables, lens = block_tables.to(torch.int32), seq_lens.contiguous()  # int32 tables in CUDA graphs: no copy
    out = q_c.new_empty(q_c.shape)  # contiguous, as the fake below says
    # Several splits write fp32 partials (B, H, splits, C) and their log-sum-exps, then one merge.
    part = out if splits == 1 else q_c.new_empty(B, H, splits, C, dtype=torch.float32)
    lse = part if splits == 1 else q_c.new_empty(B, H, splits, dtype=torch.float32)
    block_h = 16  # tl.dot wants M >= 16; fewer heads are masked
    block_c = max(16, triton.next_power_of_2(C))
    s_o = (out.stride(0), out.stride(1), 0) if splits == 1 else (part.stride(0), part.stride(1), part.stride(2))
    _mla_decode_kernel[(B, triton.cdiv(H, block_h), splits)](
        q_c, q_pe, kv, tables, lens, part, lse, scale, H, C, R, kv.shape[1], q_c.stride(0), q_c.stride(1),
        q_pe.stride(0), q_pe.stride(1), kv.stride(0), kv.stride(1), tables.stride(0), *s_o,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(R)),
        SPLITS=splits)
    if splits > 1:
        _mla_combine_kernel[(B, H)](part, lse, out, H, C, out.stride(0), out.stride(1), SPLITS=splits,
                                    BLOCK_C=block_c)
    return out


@_mla_decode_triton.register_fake
def _(q_c, q_pe, kv, block_tables, seq_lens, scale, block_n, splits):
    return q_c.new_empty(q_c.shape)  # contiguous, as the kernel's output
