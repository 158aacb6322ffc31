"""FP8 (E4M3) quantization with fine-grained scales for training (docs/fp8.md#training-recipe).

    activations, activation gradients: one scale per 1×128 tile (a token × 128 channels)   `quantize_rows`
    weights: one scale per 128×128 block                                                    `quantize_blocks`
    scale = amax / 448 in fp32 (amax clamped to ≥ 1e-4, as DeepSeek's act_quant), optionally rounded up to a
    power of two (UE8M0); q = fp8(x / scale); the real value is float(q) · scale. Ragged edges get a partial
    tile with its own scale.

`quantize_rows(x, both=True)` also returns x^T quantized along the other axis (1×128 tiles down the token dim),
which the weight-gradient GEMM needs: two Triton kernels on the GPU, one along each axis (writing xᵀ through a
transposed tile, coalesced). Each kernel sits beside its torch reference (`*_reference`), which serves where
Triton does not run. The GEMMs over these operands are in `dsv3/fp8/gemm.py` and `dsv3/fp8/grouped.py`.

Triton's interpreter casts fp32 → float8e4nv wrongly (values that round up to a power of two come back halved,
ties round away from zero), so under TRITON_INTERPRET=1 the kernel stores the scaled fp32 values and torch
does the final cast; on the GPU the kernel casts itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.format import BLOCK, FP8, FP8_MAX
from dsv3.kernels import interpreting, triton, use_triton

if triton is not None:
    import triton.language as tl

AMAX_MIN = 1e-4
INV_MAX = 1 / FP8_MAX  # scale = amax · fp32(1/448): one multiply, the same bits in torch (any device) and Triton


def _scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    s = amax.float().clamp(min=AMAX_MIN) * INV_MAX
    return torch.exp2(torch.ceil(torch.log2(s))) if ue8m0 else s


def _cast(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _pad_last(x: torch.Tensor, multiple: int = BLOCK) -> torch.Tensor:
    return F.pad(x, (0, -x.shape[-1] % multiple))


def quantize_rows_reference(x: torch.Tensor, ue8m0: bool = False, cast: bool = True):
    """x (M, K) → q (M, K) fp8, s (M, ceil(K/128)) fp32: 1×128 tiles along the last dim. `cast=False` returns
    the scaled values before the fp8 cast (what the interpreter test compares)."""
    M, K = x.shape
    tiles = _pad_last(x.float()).view(M, -1, BLOCK)
    s = _scale(tiles.abs().amax(-1), ue8m0)
    y = (tiles / s.unsqueeze(-1)).flatten(1)[:, :K].clamp(-FP8_MAX, FP8_MAX)
    return (y.to(FP8) if cast else y), s


def quantize_blocks_reference(w: torch.Tensor, ue8m0: bool = False):
    """w (..., N, K) → q (..., N, K) fp8, s (..., ceil(N/128), ceil(K/128)) fp32: 128×128 blocks."""
    *lead, N, K = w.shape
    wp = F.pad(w.float(), (0, -K % BLOCK, 0, -N % BLOCK))
    blocks = wp.view(*lead, wp.shape[-2] // BLOCK, BLOCK, wp.shape[-1] // BLOCK, BLOCK)
    s = _scale(blocks.abs().amax((-3, -1)), ue8m0)
    y = (blocks / s.unsqueeze(-1).unsqueeze(-3)).view_as(wp)[..., :N, :K]
    return _cast(y), s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(..., K) e4m3 with (..., >= ceil(K/128)) 1×128 scales along the last dim -> values in dtype."""
    K = q.shape[-1]
    return (q.to(dtype) * s.to(dtype).repeat_interleave(BLOCK, -1)[..., :K])


def quantize_rows(x: torch.Tensor, ue8m0: bool = False, both: bool = False):
    """x (M, K) → (q, s) with 1×128 tiles along K; with `both`, also (qt (K, M), st (K, ceil(M/128))): xᵀ
    quantized in 1×128 tiles along M (the operand of a GEMM that reduces over tokens). On the GPU the scales
    come M- (K-) contiguous, the layout cuBLAS's block-scaled GEMM reads without a copy."""
    if not use_triton(x):
        q, s = quantize_rows_reference(x, ue8m0)
        return (q, s, *quantize_rows_reference(x.t(), ue8m0)) if both else (q, s)
    launch = _quantize_rows_op if torch.compiler.is_compiling() else _quantize_rows_launch  # eager: no op dispatch
    out = _finish(launch(x.contiguous(), ue8m0, both))
    return tuple(t.t() if i % 2 else t for i, t in enumerate(out))  # scales were stored transposed


def quantize_blocks(w: torch.Tensor, ue8m0: bool = False, transposed: bool = False):
    """w (..., N, K) → (q, s) with 128×128 blocks; with `transposed`, also qt = qᵀ (..., K, N) contiguous (the
    weight operand of the Dgrad GEMM; its scales are sᵀ)."""
    if not use_triton(w):
        q, s = quantize_blocks_reference(w, ue8m0)
        return (q, s, q.transpose(-1, -2).contiguous()) if transposed else (q, s)
    launch = _quantize_blocks_op if torch.compiler.is_compiling() else _quantize_blocks_launch
    return _finish(launch(w.contiguous(), ue8m0, transposed))


def _finish(out: list[torch.Tensor]) -> tuple:
    """Under the interpreter the kernels stored fp32 values where fp8 goes (even places): torch casts them."""
    return tuple(_cast(t) if interpreting() and i % 2 == 0 else t for i, t in enumerate(out))


if triton is not None:
    @triton.jit
    def _div(a, b, GPU: tl.constexpr):
        # IEEE division as torch's: on the GPU Triton's fp32 `/` is approximate, so div_rn; the interpreter's `/`
        # is numpy's (IEEE) while its div_rn is not.
        if GPU:
            return tl.math.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _scale_of(amax, UE8M0: tl.constexpr):
        s = tl.maximum(amax, 1e-4) * (1.0 / 448.0)
        if UE8M0:
            s = tl.exp2(tl.ceil(tl.log2(s)))
        return s

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, BM: tl.constexpr, UE8M0: tl.constexpr, GPU: tl.constexpr):
        """One program: BM rows × 128 columns of x -> q and the row scales, stored transposed: s (K/128, M)."""
        pm, pk = tl.program_id(0), tl.program_id(1)
        rows = pm * BM + tl.arange(0, BM)
        cols = pk * 128 + tl.arange(0, 128)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(tl.max(tl.abs(x), axis=1), UE8M0)
        y = tl.clamp(_div(x, s[:, None], GPU), -448.0, 448.0)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + pk * M + rows, s, mask=rows < M)

    @triton.jit
    def _quant_cols_kernel(x_ptr, qt_ptr, st_ptr, M, K, BK: tl.constexpr, UE8M0: tl.constexpr, GPU: tl.constexpr):
        """One program: 128 rows × BK columns of x -> those columns of xᵀ quantized along the rows (qt (K, M),
        written through a transposed tile: coalesced along M) and their scales st (M/128, K). A kernel of its own:
        fused into the row kernel, the 128×128 tile's transposed store ran further from the memory floor than the
        two kernels do (measured: docs/fp8.md#fp8-training)."""
        pm, pk = tl.program_id(0), tl.program_id(1)
        rows = pm * 128 + tl.arange(0, 128)
        cols = pk * BK + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < K),
                    other=0.0).to(tl.float32)
        st = _scale_of(tl.max(tl.abs(x), axis=0), UE8M0)
        yt = tl.trans(tl.clamp(_div(x, st[None, :], GPU), -448.0, 448.0).to(qt_ptr.dtype.element_ty))
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], yt, mask=(cols[:, None] < K) & (rows[None, :] < M))
        tl.store(st_ptr + pm * K + cols, st, mask=cols < K)

    @triton.jit
    def _quant_blocks_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, nnb, nkb,
                             TRANS: tl.constexpr, UE8M0: tl.constexpr, GPU: tl.constexpr):
        """One program: one 128×128 block of matrix e = program_id(2); q, and (TRANS) qᵀ, and its scale."""
        pn, pk, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = pn * 128 + tl.arange(0, 128)
        cols = pk * 128 + tl.arange(0, 128)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        base = e * N * K
        w = tl.load(w_ptr + base + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(tl.max(tl.max(tl.abs(w), axis=1), axis=0), UE8M0)
        y = tl.clamp(_div(w, s, GPU), -448.0, 448.0).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + base + rows[:, None] * K + cols[None, :], y, mask=mask)
        if TRANS:
            tl.store(qt_ptr + base + cols[None, :] * N + rows[:, None], y, mask=mask)
        tl.store(s_ptr + (e * nnb + pn) * nkb + pk, s)

def _store_dtype():
    return torch.float32 if interpreting() else FP8


def _quantize_rows_launch(x: torch.Tensor, ue8m0: bool, both: bool) -> list[torch.Tensor]:
    M, K = x.shape
    nkb, nmb = -(-K // BLOCK), -(-M // BLOCK)
    q, s = torch.empty(M, K, dtype=_store_dtype(), device=x.device), torch.empty(nkb, M, device=x.device)
    gpu = not interpreting()
    _quant_rows_kernel[(triton.cdiv(M, 32), nkb)](x, q, s, M, K, BM=32, UE8M0=ue8m0, GPU=gpu, num_warps=4)
    if not both:
        return [q, s]  # scales transposed: (K/128, M)
    qt, st = torch.empty(K, M, dtype=q.dtype, device=x.device), torch.empty(nmb, K, device=x.device)
    _quant_cols_kernel[(nmb, triton.cdiv(K, 64))](x, qt, st, M, K, BK=64, UE8M0=ue8m0, GPU=gpu, num_warps=4)
    return [q, s, qt, st]  # and (M/128, K)


def _quantize_blocks_launch(w: torch.Tensor, ue8m0: bool, transposed: bool) -> list[torch.Tensor]:
    *lead, N, K = w.shape
    E = w.numel() // (N * K) if w.numel() else 0
    nnb, nkb = -(-N // BLOCK), -(-K // BLOCK)
    q = torch.empty(w.shape, dtype=_store_dtype(), device=w.device)
    # The kernel's transposed store is wrong for fp32 input on an H100 (Triton 3.6: many bytes of qᵀ differ from
    # q's, some NaN; bf16 input is bit-exact), so fp32 weights (fp32 master weights) get qᵀ from torch.
    in_kernel = transposed and w.element_size() == 2
    qt = torch.empty(*lead, K, N, dtype=q.dtype, device=w.device) if in_kernel else q
    s = torch.empty(*lead, nnb, nkb, device=w.device)
    if E:
        _quant_blocks_kernel[(nnb, nkb, E)](w, q, qt, s, N, K, nnb, nkb, TRANS=in_kernel, UE8M0=ue8m0,
                                            GPU=not interpreting(), num_warps=8)
    if transposed and not in_kernel:
        qt = q.transpose(-1, -2).contiguous()
    return [q, s, qt] if transposed else [q, s]


# Opaque ops for torch.compile: Inductor does not trace into the kernels.
_quantize_rows_op = torch.library.custom_op("dsv3::fp8_quantize_rows", _quantize_rows_launch, mutates_args=())
_quantize_blocks_op = torch.library.custom_op("dsv3::fp8_quantize_blocks", _quantize_blocks_launch,
                                              mutates_args=())


@_quantize_rows_op.register_fake
def _(x, ue8m0, both):
    M, K = x.shape
    q, s = x.new_empty(M, K, dtype=_store_dtype()), x.new_empty(-(-K // BLOCK), M, dtype=torch.float32)
    return [q, s, x.new_empty(K, M, dtype=q.dtype), x.new_empty(-(-M // BLOCK), K, dtype=torch.float32)] \
        if both else [q, s]


@_quantize_blocks_op.register_fake
def _(w, ue8m0, transposed):
    *lead, N, K = w.shape
    q, s = w.new_empty(w.shape, dtype=_store_dtype()), w.new_empty(*lead, -(-N // BLOCK), -(-K // BLOCK),
                                                                    dtype=torch.float32)
    return [q, s, w.new_empty(*lead, K, N, dtype=q.dtype)] if transposed else [q, s]
