"""Routed experts for a few rows (decode): SwiGLU of every expert over its rows in two Triton kernels.

Rows are the (token, expert) pairs sorted by expert (`order`, group ends `offs`), as for the grouped GEMM. Instead
of gathering x, two grouped GEMMs and their setup kernels, and the SwiGLU in between, one program per (expert,
block of output columns) walks its expert's rows 16 at a time, reading that block of its expert's weights once:

    h_r = silu(x_t · W_gate_eᵀ) ⊙ (x_t · W_up_eᵀ) · w_r        kernel 1, x_t gathered by row r's token t
    y_r = h_r · W_down_eᵀ                                      kernel 2

An expert with no rows costs a program that exits at once. Worth it while experts have few rows each: at decode
sizes these two kernels take less time than CUTLASS's grouped GEMMs and their setup kernels (two of each per layer).
At most 16 rows (one token) need no sort: each program finds its expert's rows among them, which spares a batch-1
step the sort's kernels (both measured: docs/inference.md#decode-speed).

With FP8 weights at inference (e4m3, 128×128 block scales: dsv3/fp8/inference.py) each program widens its
weight tiles as it loads them and scales each 128-wide slice of the reduction by its block's scale.

`moe_ffn` runs these kernels on CUDA tensors (or under TRITON_INTERPRET=1, how CI tests them on a CPU).
"""
from __future__ import annotations

import torch

from dsv3.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _expert_rows(rows, offs, e, R, BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
        """[start, end) of the rows to walk for expert e: its group of the sorted rows (group ends `offs`); or,
        unsorted (R <= BLOCK_M rows, `rows` their experts), all R if any is e's, else none."""
        if SORTED:
            start, end = tl.load(offs + e - 1, mask=e > 0, other=0), tl.load(offs + e)
        else:
            m = tl.arange(0, BLOCK_M)
            mine = tl.sum((tl.load(rows + m, mask=m < R, other=-1) == e).to(tl.int32))
            start, end = 0, tl.where(mine > 0, R, 0)
        return start, end

    @triton.jit
    def _chunk(rows, m, end, e, K, SORTED: tl.constexpr):
        """Which of rows m (< end) are expert e's, and their tokens."""
        if SORTED:
            mm = m < end
            tok = tl.load(rows + m, mask=mm, other=0) // K
        else:
            mm = (m < end) & (tl.load(rows + m, mask=m < end, other=-1) == e)
            tok = m // K
        return mm, tok

    @triton.jit
    def _mac(acc, a, w, s_ptr, s_mask, SCALED: tl.constexpr):
        """acc + a · w; with SCALED, w is e4m3 (widened to a's dtype) and the product takes the per-column block
        scales at s_ptr (one 128-wide slice of the reduction: the caller's step divides 128)."""
        if SCALED:
            acc += tl.dot(a, w.to(a.dtype)) * tl.load(s_ptr, mask=s_mask, other=0.0)[None, :]
        else:
            acc = tl.dot(a, w, acc)
        return acc

    @triton.jit
    def _gate_up_kernel(x, w1, s1, rows, offs, rw, h, R, K, D, F, s_x, s_w1e, s_w1f, s_s1e, s_s1f, s_h,
                        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, SORTED: tl.constexpr,
                        SCALED: tl.constexpr):
        e = tl.program_id(0)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fm = f < F
        start, end = _expert_rows(rows, offs, e, R, BLOCK_M, SORTED)
        wg = w1 + e * s_w1e + f[None, :] * s_w1f  # (1, BLOCK_F) row pointers of the gate block; up is F rows on
        while start < end:  # `while`, not a runtime range: Triton 3.6's interpreter fails on those
            m = start + tl.arange(0, BLOCK_M)
            mm, tok = _chunk(rows, m, end, e, K, SORTED)
            acc_g = tl.zeros([BLOCK_M, BLOCK_F], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_F], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                xa = tl.load(x + tok[:, None] * s_x + d[None, :], mask=mm[:, None] & dm[None, :], other=0.0)
                wmask = dm[:, None] & fm[None, :]
                g = tl.load(wg + d[:, None], mask=wmask, other=0.0)  # (BLOCK_D, BLOCK_F): W_gateᵀ's block
                u = tl.load(wg + F * s_w1f + d[:, None], mask=wmask, other=0.0)
                sb = s1 + e * s_s1e + d0 // 128  # SCALED: each row block's scale for this 128-wide slice
                acc_g = _mac(acc_g, xa, g, sb + (f // 128) * s_s1f, fm, SCALED)
                acc_u = _mac(acc_u, xa, u, sb + ((F + f) // 128) * s_s1f, fm, SCALED)
            r = tl.load(rw + m, mask=mm, other=0.0).to(tl.float32)
            out = acc_g * tl.sigmoid(acc_g) * acc_u * r[:, None]
            tl.store(h + m[:, None] * s_h + f[None, :], out.to(h.dtype.element_ty), mask=mm[:, None] & fm[None, :])
            start += BLOCK_M

    @triton.jit
    def _down_kernel(h, w2, s2, rows, offs, y, R, K, D, F, s_h, s_w2e, s_w2d, s_s2e, s_s2d, s_y,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, SORTED: tl.constexpr,
                     SCALED: tl.constexpr):
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < D
        start, end = _expert_rows(rows, offs, e, R, BLOCK_M, SORTED)
        while start < end:
            m = start + tl.arange(0, BLOCK_M)
            mm, _ = _chunk(rows, m, end, e, K, SORTED)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for f0 in range(0, F, BLOCK_F):
                f = f0 + tl.arange(0, BLOCK_F)
                fm = f < F
                ha = tl.load(h + m[:, None] * s_h + f[None, :], mask=mm[:, None] & fm[None, :], other=0.0)
                wd = tl.load(w2 + e * s_w2e + n[None, :] * s_w2d + f[:, None], mask=fm[:, None] & nm[None, :],
                             other=0.0)  # (BLOCK_F, BLOCK_N): W_downᵀ's block
                acc = _mac(acc, ha, wd, s2 + e * s_s2e + (n // 128) * s_s2d + f0 // 128, nm, SCALED)
            tl.store(y + m[:, None] * s_y + n[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & nm[None, :])
            start += BLOCK_M


# Block sizes and launch settings for up to 16 rows (a few tokens) and for more: the fastest of
# benchmarks/sweep_moe_decode.py on an H100 at batch 1 and 32 (bench-684m; either setting is slower for the other
# batch; measured: docs/inference.md#decode-speed).
GATE_UP = {"few": dict(BLOCK_F=32, BLOCK_D=256, num_warps=4, num_stages=4),
           "many": dict(BLOCK_F=32, BLOCK_D=128, num_warps=4, num_stages=2)}
DOWN = {"few": dict(BLOCK_N=32, BLOCK_F=64, num_warps=2, num_stages=4),
        "many": dict(BLOCK_N=32, BLOCK_F=128, num_warps=2, num_stages=2)}


def usable(x: torch.Tensor, rows: int, experts: int, fp8: bool = False) -> bool:
    """These kernels serve (rather than the grouped GEMM) inference steps whose experts have 8 rows or fewer on
    average: every program reads its block of weights once per 16 of its expert's rows. With FP8 weights, steps of
    any size: the alternative, a dequantized copy of a layer's experts, would not even fit for DeepSeek-V3."""
    return use_triton(x) and not torch.is_grad_enabled() and (fp8 or rows <= 8 * experts)


FEW = 16  # rows up to which the kernels take them unsorted (one chunk of BLOCK_M)


def moe_ffn(x, gate_up_proj, down_proj, rows, w, top_k: int, offs=None, scales=None):
    """x (N, D); gate_up_proj (E, 2F, D) (gate rows first); down_proj (E, D, F); w (N·K,) routing weights of the
    (token, expert) pairs (pair p = token p // top_k) -> (N·K, D) each pair's expert output, scaled by its weight.
    Either `rows` are the pairs sorted by expert, group ends `offs` (E,), and w and the output in that order; or,
    for at most FEW pairs and no `offs`, `rows` is each pair's expert, in pair order: each program picks its
    expert's pairs out of them, and nothing needs sorting (at batch 1, that sort was 4 of a layer's kernels).
    `scales`: the two weights are e4m3 with these 128×128 block scales, (E, ceil(2F/128), ceil(D/128)) and
    (E, ceil(D/128), ceil(F/128)) (FP8 weights at inference)."""
    if offs is None and rows.shape[0] > FEW:
        raise ValueError(f"unsorted rows: at most {FEW}, got {rows.shape[0]}")
    return _moe_ffn(x, gate_up_proj, down_proj, rows, w, top_k, offs, *(scales or (None, None)))


# Opaque to torch.compile (the decode graph records it as one call), like dsv3::mla_decode.
@torch.library.custom_op("dsv3::moe_ffn", mutates_args=())
def _moe_ffn(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, rows: torch.Tensor,
             w: torch.Tensor, top_k: int, offs: torch.Tensor | None, gate_up_scale: torch.Tensor | None,
             down_scale: torch.Tensor | None) -> torch.Tensor:
    E, F2, D = gate_up_proj.shape
    F, R = F2 // 2, rows.shape[0]
    x = x.contiguous()
    scaled = gate_up_scale is not None
    if scaled:
        w1, w2 = gate_up_proj.contiguous(), down_proj.contiguous()
        s1, s2 = gate_up_scale.float().contiguous(), down_scale.float().contiguous()
    else:
        w1, w2 = gate_up_proj.to(x.dtype).contiguous(), down_proj.to(x.dtype).contiguous()
        s1 = s2 = w1  # (unused)
    sorted_ = offs is not None
    rows, w = rows.contiguous(), w.contiguous()
    offs = offs.to(torch.int32).contiguous() if sorted_ else rows  # (unsorted: unused)
    h = x.new_empty(R, F)
    y = x.new_empty(R, D)
    size = "few" if R <= FEW else "many"
    up, down = GATE_UP[size], DOWN[size]
    if scaled:  # one block scale per reduction step
        up, down = dict(up, BLOCK_D=min(up["BLOCK_D"], 128)), dict(down, BLOCK_F=min(down["BLOCK_F"], 128))
    if w1.element_size() == 4:  # an fp32 model: with bf16's stages its tiles need 240 KB of shared memory (> H100's)
        up = dict(up, num_stages=min(up["num_stages"], 2))
    _gate_up_kernel[(E, triton.cdiv(F, up["BLOCK_F"]))](
        x, w1, s1, rows, offs, w, h, R, top_k, D, F, x.stride(0), w1.stride(0), w1.stride(1), s1.stride(0),
        s1.stride(1), h.stride(0), BLOCK_M=FEW, SORTED=sorted_, SCALED=scaled, **up)  # tl.dot: M >= 16, masked
    _down_kernel[(E, triton.cdiv(D, down["BLOCK_N"]))](
        h, w2, s2, rows, offs, y, R, top_k, D, F, h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0),
        s2.stride(1), y.stride(0), BLOCK_M=FEW, SORTED=sorted_, SCALED=scaled, **down)
    return y


@_moe_ffn.register_fake
def _(x, gate_up_proj, down_proj, rows, w, top_k, offs, gate_up_scale, down_scale):
    return x.new_empty(rows.shape[0], gate_up_proj.shape[2])
