"""Block-scaled FP8 grouped GEMMs for the routed experts in training (DeepSeek-V3 report §3.3; the FP8 recipe:
docs/fp8.md#training-recipe).

Layout. Values are e4m3 (`torch.float8_e4m3fn`) with fp32 scales used as multipliers (real = float(q) · s):
activations and gradients carry one scale per 1×128 slice along the reduction dim, weights one per 128×128 block.
A dim that is not a multiple of 128 ends in a partial block with its own scale.

Groups. Rows (tokens) are sorted by expert and the caller pads every group to a multiple of 128 with zero rows,
so each group starts at a row that is a multiple of 128. `offs` (E,) int32 holds the cumulative *padded* group
ends, all multiples of 128 (the GPU wgrad kernel relies on it to vectorise); group e is rows [offs[e-1], offs[e])
(0 before the first), groups may be empty and rows past offs[-1] <= R are unused: never read by wgrad, their
outputs in fprop left undefined. Because of the padding a 128-row tile of activations lies in one group, and so
does every 128-row slice that wgrad reduces over. Loads vectorise (and so pipeline) when the row strides, K and R
are multiples of 16.

    grouped_fp8_mm:        out_RN[rows of e] = A_e · B_e^T        A (R, K) 1×128 along K, B (E, N, K) 128×128
    grouped_fp8_mm_wgrad:  out_ENK[e] = G_e · X_e^T               G = dY^T (N, R), X = X^T (K, R), 1×128 along R

Fprop is grouped_fp8_mm(x, W); dgrad is grouped_fp8_mm(dY, W^T) with the weights and their scale grid
transposed (contiguous) by the caller. Both kernels accumulate in fp32 and apply the scales once per 128-long K
step (`acc += dot(a, b) · s_a · s_b`): DeepSeek's promotion of the tensor cores' limited-precision fp8 sums to
fp32 every 128 elements. The Triton kernels run on CUDA tensors (or anywhere under TRITON_INTERPRET=1, which is
how CI tests them on a CPU) and never synchronise with the host; the torch references serve everywhere else.
"""
from __future__ import annotations

import torch

from dsv3.fp8.format import BLOCK, dequantize_blocks  # BLOCK: the scales', so the K step
from dsv3.fp8.gemm import fp8_mm
from dsv3.fp8.quantize import dequantize_rows
from dsv3.kernels import interpreting, triton, use_triton

if triton is not None:
    import triton.language as tl


def grouped_fp8_mm_reference(a_q, a_s, b_q, b_s, offs, out_dtype=torch.bfloat16, compute_dtype=torch.float32):
    """Dequantize each group in compute_dtype and multiply; rows outside every group come out zero."""
    out = torch.zeros(a_q.shape[0], b_q.shape[1], dtype=compute_dtype, device=a_q.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # host sync: fine for a reference path
        if end > start:
            a = dequantize_rows(a_q[start:end], a_s[start:end], compute_dtype)  # (rows, K)
            out[start:end] = a @ dequantize_blocks(b_q[e], b_s[e], compute_dtype).T
        start = end
    return out.to(out_dtype)


def grouped_fp8_mm_wgrad_reference(g_q, g_s, x_q, x_s, offs, out_dtype=torch.float32, compute_dtype=torch.float32):
    """out[e] = G[:, rows of e] · X[:, rows of e]^T in compute_dtype; empty groups give zeros."""
    out = torch.zeros(offs.shape[0], g_q.shape[0], x_q.shape[0], dtype=compute_dtype, device=g_q.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:  # start is a multiple of 128, so the group's scales start at column start // 128
            g = dequantize_rows(g_q[:, start:end], g_s[:, start // BLOCK:], compute_dtype)  # (N, rows)
            x = dequantize_rows(x_q[:, start:end], x_s[:, start // BLOCK:], compute_dtype)  # (K, rows)
            out[e] = g @ x.T
        start = end
    return out.to(out_dtype)


if triton is not None:
    # Triton 3.6's interpreter cannot range() over a runtime scalar (numpy refuses int() of its 1-element arrays),
    # so under INTERPRET the reduction loops are `while` loops; on the GPU they are `for` loops, which Triton
    # pipelines (num_stages). The step bodies are shared jit helpers, inlined into both. Loads of fp8 and tl.dot on
    # fp8 operands give the right values in the interpreter (checked against float(q); it computes through numpy).
    @triton.jit
    def _fwd_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptr, kb, m_mask, n_mask, K, BLOCK_K: tl.constexpr):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK) fp8
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # (BK, BN) fp8
        sa = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)  # (BM,) one scale per row for this K slice
        sb = tl.load(bs_ptr + kb)  # the B tile lies in one 128×128 scale block
        return acc + tl.dot(a, b) * (sa[:, None] * sb)  # fp8 × fp8 -> fp32, promoted every 128 K

    @triton.jit
    def _grouped_fp8_fwd_kernel(a, a_s, b, b_s, offs, out, R, N, K, E,
                                s_a_r, s_as_r, s_b_e, s_b_n, s_bs_e, s_bs_n, s_o_r,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_E: tl.constexpr, INTERPRET: tl.constexpr):
        # One program: a BLOCK_M × BLOCK_N tile of out. BLOCK_M divides 128, so the tile's rows lie in one group.
        m0 = tl.program_id(0) * BLOCK_M
        n0 = tl.program_id(1) * BLOCK_N
        e_idx = tl.arange(0, BLOCK_E)
        ends = tl.load(offs + e_idx, mask=e_idx < E, other=2147483647)  # (BLOCK_E,) padded lanes never "end"
        if m0 >= tl.load(offs + E - 1):  # the grid covers all R rows; rows past offs[-1] are padding
            return
        g = tl.sum((ends <= m0).to(tl.int32), axis=0)  # groups ending at or before m0 = index of m0's group
        rm = m0 + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < tl.minimum(tl.load(offs + g), R)
        n_mask = rn < N
        rm64, rn64, g64 = rm.to(tl.int64), rn.to(tl.int64), g.to(tl.int64)  # R·K and E·N·K can pass 2^31
        a_ptrs = a + rm64[:, None] * s_a_r + rk[None, :]
        # B_e is (N, K) row-major; tl.dot wants (K, N): load the tile transposed (K-contiguous, as fp8 wgmma wants).
        b_ptrs = b + g64 * s_b_e + rn64[None, :] * s_b_n + rk[:, None]
        as_ptrs = a_s + rm64 * s_as_r
        bs_ptr = b_s + g64 * s_bs_e + (n0 // BLOCK_K) * s_bs_n
        n_k = tl.cdiv(K, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if INTERPRET:
            kb = 0
            while kb < n_k:
                acc = _fwd_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptr, kb, m_mask, n_mask, K, BLOCK_K)
                kb += 1
        else:
            for kb in range(0, n_k):
                acc = _fwd_step(acc, a_ptrs, b_ptrs, as_ptrs, bs_ptr, kb, m_mask, n_mask, K, BLOCK_K)
        tl.store(out + rm64[:, None] * s_o_r + rn[None, :], acc.to(out.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _wgrad_step(acc, g_ptrs, x_ptrs, gs_ptrs, xs_ptrs, r, end, n_mask, k_mask, BLOCK_R: tl.constexpr):
        rr = r + tl.arange(0, BLOCK_R)
        r_mask = rr < end
        gt = tl.load(g_ptrs + rr[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # (BN, BR) fp8
        xt = tl.load(x_ptrs + rr[:, None], mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # (BR, BK) fp8
        sg = tl.load(gs_ptrs + r // BLOCK_R, mask=n_mask, other=0.0)  # (BN,)
        sx = tl.load(xs_ptrs + r // BLOCK_R, mask=k_mask, other=0.0)  # (BK,)
        return acc + tl.dot(gt, xt) * (sg[:, None] * sx[None, :])

    @triton.jit
    def _grouped_fp8_wgrad_kernel(g, g_s, x, x_s, offs, out, N, K, R,
                                  s_g_n, s_gs_n, s_x_k, s_xs_k, s_o_e, s_o_n,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                  INTERPRET: tl.constexpr):
        # One program: a BLOCK_N × BLOCK_K tile of out[e], reducing over group e's rows 128 at a time.
        e = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask, k_mask = rn < N, rk < K
        # Group bounds are multiples of 128 (the padding convention). Saying so lets the compiler vectorise the
        # row-masked loads below: without it they are byte-wide and the loop is not pipelined (cp.async takes >= 4).
        start = tl.multiple_of(tl.where(e > 0, tl.load(offs + tl.maximum(e - 1, 0)), 0), BLOCK_R)
        end = tl.minimum(tl.multiple_of(tl.load(offs + e), BLOCK_R), R)
        rn64, rk64 = rn.to(tl.int64), rk.to(tl.int64)
        # G (N, R) and X (K, R) are contiguous along the rows, the reduction dim, as fp8 wgmma wants both operands.
        g_ptrs = g + rn64[:, None] * s_g_n  # (BN, 1) + rows
        x_ptrs = x + rk64[None, :] * s_x_k  # (1, BK) + rows: the (BR, BK) tile the dot wants, loaded transposed
        gs_ptrs = g_s + rn64 * s_gs_n
        xs_ptrs = x_s + rk64 * s_xs_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if INTERPRET:
            r = start
            while r < end:
                acc = _wgrad_step(acc, g_ptrs, x_ptrs, gs_ptrs, xs_ptrs, r, end, n_mask, k_mask, BLOCK_R)
                r += BLOCK_R
        else:
            for r in range(start, end, BLOCK_R):
                acc = _wgrad_step(acc, g_ptrs, x_ptrs, gs_ptrs, xs_ptrs, r, end, n_mask, k_mask, BLOCK_R)
        tl.store(out + e.to(tl.int64) * s_o_e + rn64[:, None] * s_o_n + rk[None, :], acc.to(out.dtype.element_ty),
                 mask=n_mask[:, None] & k_mask[None, :])


def _check_block(name: str, value: int, largest: int) -> None:
    if not 16 <= value <= largest or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two in [16, {largest}]")


# From this many rows per expert on average (on Hopper), each expert's GEMMs go to cuBLAS's block-scaled GEMM, one
# call per expert after a host sync for the group ends, instead of the grouped Triton kernels. At v3-slice's ~4,096
# rows per expert these are dense shapes where cuBLAS beats bf16 and the Triton kernels do not (measured:
# docs/fp8.md#fp8-training). `backend=` picks either explicitly ("triton", "cublas").
CUBLAS_ROWS = 1024


def _cublas_ends(t: torch.Tensor, rows: int, offs: torch.Tensor, backend: str) -> list[int] | None:
    """The group ends on the host when the per-expert cuBLAS path serves this call (`rows`: the buffer's, an upper
    bound of the groups' total, which spares a sync when it is already too small), else None."""
    if backend == "triton" or (backend == "auto" and (
            not t.is_cuda or torch.cuda.get_device_capability(t.device) < (9, 0)
            or rows < CUBLAS_ROWS * offs.shape[0])):
        return None
    ends = offs.tolist()
    return ends if backend == "cublas" or ends[-1] >= CUBLAS_ROWS * len(ends) else None


def _per_expert_mm(a_q, a_s, b_q, b_s, ends: list[int], out_dtype):
    """grouped_fp8_mm as one fp8_mm per non-empty group (rows past the last group left undefined)."""
    out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype, device=a_q.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = fp8_mm(a_q[start:end], a_s[start:end], b_q[e], b_s[e], True, out_dtype)
        start = end
    return out


def _per_expert_wgrad(g_q, g_s, x_q, x_s, ends: list[int], out_dtype):
    """grouped_fp8_mm_wgrad as one fp8_mm per group: each group's columns of G and X (contiguous copies, as the
    GEMM reads its operands K-major) and their 1×128 scales along the rows."""
    out = torch.zeros(len(ends), g_q.shape[0], x_q.shape[0], dtype=out_dtype, device=g_q.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            cols = slice(start // BLOCK, end // BLOCK)
            out[e] = fp8_mm(g_q[:, start:end].contiguous(), g_s[:, cols], x_q[:, start:end].contiguous(),
                            x_s[:, cols], False, out_dtype)
        start = end
    return out


def grouped_fp8_mm(a_q, a_s, b_q, b_s, offs, out_dtype=torch.bfloat16, *, block_m: int = 128, block_n: int = 128,
                   num_warps: int = 8, num_stages: int = 3, backend: str = "auto"):
    """(R, N) in out_dtype: rows of group e = A_e · B_e^T; see the module docstring for layouts and `offs`.

    block_m and block_n must divide 128 (a tile's rows in one group, a B tile in one 128×128 scale block).
    `backend`: "auto" (the per-expert cuBLAS GEMMs for large groups, see CUBLAS_ROWS), "triton" or "cublas"."""
    if (ends := _cublas_ends(a_q, a_q.shape[0], offs, backend)) is not None:
        return _per_expert_mm(a_q, a_s, b_q, b_s, ends, out_dtype)
    if not use_triton(a_q):
        return grouped_fp8_mm_reference(a_q, a_s, b_q, b_s, offs, out_dtype)
    _check_block("block_m", block_m, 128)
    _check_block("block_n", block_n, 128)
    return _grouped_fp8_mm_triton(a_q, a_s, b_q, b_s, offs, out_dtype, block_m, block_n, num_warps, num_stages)


def grouped_fp8_mm_wgrad(g_q, g_s, x_q, x_s, offs, out_dtype=torch.float32, *, block_n: int = 128,
                         block_k: int = 128, num_warps: int = 8, num_stages: int = 3, backend: str = "auto"):
    """(E, N, K) in out_dtype: out[e] = G_e · X_e^T over group e's rows; see the module docstring."""
    if (ends := _cublas_ends(g_q, g_q.shape[1], offs, backend)) is not None:
        return _per_expert_wgrad(g_q, g_s, x_q, x_s, ends, out_dtype)
    if not use_triton(g_q):
        return grouped_fp8_mm_wgrad_reference(g_q, g_s, x_q, x_s, offs, out_dtype)
    _check_block("block_n", block_n, 256)
    _check_block("block_k", block_k, 256)
    return _grouped_fp8_wgrad_triton(g_q, g_s, x_q, x_s, offs, out_dtype, block_n, block_k, num_warps, num_stages)


# Opaque ops to torch.compile, as in mla_decode: Inductor calls the launchers and does not re-trace the kernels.
@torch.library.custom_op("dsv3::grouped_fp8_mm", mutates_args=())
def _grouped_fp8_mm_triton(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                           offs: torch.Tensor, out_dtype: torch.dtype, block_m: int, block_n: int, num_warps: int,
                           num_stages: int) -> torch.Tensor:
    (R, K), (E, N, _) = a_q.shape, b_q.shape
    a_q, a_s, b_q = a_q.contiguous(), a_s.float().contiguous(), b_q.contiguous()
    b_s, offs = b_s.float().contiguous(), offs.to(torch.int32).contiguous()
    out = torch.empty(R, N, dtype=out_dtype, device=a_q.device)
    if R == 0 or N == 0 or E == 0:
        return out
    grid = (triton.cdiv(R, block_m), triton.cdiv(N, block_n))
    _grouped_fp8_fwd_kernel[grid](a_q, a_s, b_q, b_s, offs, out, R, N, K, E,
                                  a_q.stride(0), a_s.stride(0), b_q.stride(0), b_q.stride(1), b_s.stride(0),
                                  b_s.stride(1), out.stride(0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
                                  BLOCK_E=max(2, triton.next_power_of_2(E)),
                                  INTERPRET=interpreting(),
                                  num_warps=num_warps, num_stages=num_stages)
    return out


@_grouped_fp8_mm_triton.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype, block_m, block_n, num_warps, num_stages):
    return a_q.new_empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype)


@torch.library.custom_op("dsv3::grouped_fp8_mm_wgrad", mutates_args=())
def _grouped_fp8_wgrad_triton(g_q: torch.Tensor, g_s: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor,
                              offs: torch.Tensor, out_dtype: torch.dtype, block_n: int, block_k: int,
                              num_warps: int, num_stages: int) -> torch.Tensor:
    (N, R), K, E = g_q.shape, x_q.shape[0], offs.shape[0]
    g_q, g_s, x_q = g_q.contiguous(), g_s.float().contiguous(), x_q.contiguous()
    x_s, offs = x_s.float().contiguous(), offs.to(torch.int32).contiguous()
    out = torch.empty(E, N, K, dtype=out_dtype, device=g_q.device)
    if out.numel() == 0:
        return out
    grid = (E, triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _grouped_fp8_wgrad_kernel[grid](g_q, g_s, x_q, x_s, offs, out, N, K, R,
                                    g_q.stride(0), g_s.stride(0), x_q.stride(0), x_s.stride(0), out.stride(0),
                                    out.stride(1),
                                    BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=BLOCK,
                                    INTERPRET=interpreting(),
                                    num_warps=num_warps, num_stages=num_stages)
    return out


@_grouped_fp8_wgrad_triton.register_fake
def _(g_q, g_s, x_q, x_s, offs, out_dtype, block_n, block_k, num_warps, num_stages):
    return g_q.new_empty(offs.shape[0], g_q.shape[0], x_q.shape[0], dtype=out_dtype)
