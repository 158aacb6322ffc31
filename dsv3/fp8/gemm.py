"""GEMMs over FP8 operands: the block-scaled GEMM of FP8 training, and the weight-only GEMM of FP8 inference.

`fp8_mm(a, b)` is C = A·Bᵀ over quantized operands (docs/fp8.md#training-recipe): `torch._scaled_mm` with
block-wise scales on Hopper (cuBLAS, fp32 accumulation), and an exact emulation elsewhere (dequantize, fp32
matmul) so CPU runs and CI compute the same function.

`fp8_weight_mm(x, W)` is y = x·Wᵀ for W held in e4m3 with 128×128 block scales (docs/fp8.md#fp8-inference-weights):
the activations keep their dtype; a Triton kernel on the GPU widens each weight tile as it loads it, and its torch
reference dequantizes W for an ordinary matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.fp8.format import BLOCK, dequantize_blocks
from dsv3.fp8.quantize import dequantize_rows
from dsv3.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl


def _scaled_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0)
            and a.shape[1] % BLOCK == 0 and a.shape[0] % 16 == 0 and b.shape[0] % 16 == 0)


def fp8_mm(a_q, a_s, b_q, b_s, b_blocks: bool, out_dtype=torch.bfloat16) -> torch.Tensor:
    """C (M, N) = A (M, K) · B (N, K)ᵀ with fp32 accumulation. a_s (M, K/128): 1×128 tiles. b_s: (N/128, K/128)
    128×128 blocks when `b_blocks` (a weight), else (N, K/128) 1×128 tiles (an activation)."""
    if _scaled_mm_ok(a_q, b_q):
        # cuBLAS block-scaled GEMM: B column-major; 1×128 scales outer-dim-major (M- / N-contiguous).
        sa = a_s.t().contiguous().t()
        if b_blocks and b_s.shape[1] % 4 == 0:  # (K/128, N/128), K-contiguous
            sb = b_s.contiguous().t()
        else:  # 1×128 tiles, (K/128, N) N-contiguous; cuBLAS takes 128×128 blocks only for K/128 % 4 == 0, so
            # other weights go as 1×128 tiles (each block's scale repeated over its rows: the same numbers)
            sb = (b_s.repeat_interleave(BLOCK, 0)[:b_q.shape[0]] if b_blocks else b_s).t().contiguous()
        return torch._scaled_mm(a_q, b_q.t(), sa, sb, out_dtype=out_dtype)
    a = dequantize_rows(a_q, a_s)
    b = dequantize_blocks(b_q, b_s) if b_blocks else dequantize_rows(b_q, b_s)
    return (a @ b.t()).to(out_dtype)


if triton is not None:
    @triton.jit
    def _w8_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, s_x, s_y, s_s,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_M rows × BLOCK_N output features (inside one 128-row block of W) of y = x · Wᵀ, W's
        e4m3 values widened to x's dtype, each 128-wide slice of the reduction scaled by its block's scale in fp32."""
        pm, pn = tl.program_id(0), tl.program_id(1)
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rm, cm = rows < M, cols < N
        scales = s_ptr + (pn * BLOCK_N // 128) * s_s
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, 128):
            k = k0 + tl.arange(0, 128)
            km = k < K
            x = tl.load(x_ptr + rows[:, None] * s_x + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * K + k[:, None], mask=cm[None, :] & km[:, None], other=0.0)  # Wᵀ
            acc += tl.dot(x, w.to(x.dtype)) * tl.load(scales + k0 // 128)
        tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])

    @triton.jit
    def _w8_splitk_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, s_x, s_y, s_s, k_per_split,
                          SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The few-rows (decode) form: program (pn, pk) sums the pk-th slice of the reduction (k_per_split wide, a
        multiple of 128) for BLOCK_N output features, so that a narrow W still spreads over every SM. Each program
        leaves its fp32 partial in `part` and takes a ticket; the last of an output block's SPLIT_K programs adds
        the partials in a fixed order (the result does not depend on which finished last), writes y and puts the
        ticket counter back to 0 for the next call: one launch, no memset."""
        pn, pk = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rm, cm = rows < M, cols < N
        scales = s_ptr + (pn * BLOCK_N // 128) * s_s
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(pk * k_per_split, tl.minimum(pk * k_per_split + k_per_split, K), 128):
            k = k0 + tl.arange(0, 128)
            km = k < K
            x = tl.load(x_ptr + rows[:, None] * s_x + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * K + k[:, None], mask=cm[None, :] & km[:, None], other=0.0)  # Wᵀ
            acc += tl.dot(x, w.to(x.dtype)) * tl.load(scales + k0 // 128)
        tile = rows[:, None] * N + cols[None, :]
        mask = rm[:, None] & cm[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
            return
        tl.store(part_ptr + pk * BLOCK_M * N + tile, acc, mask=mask)
        # Every thread's partial is stored (the barrier) before the ticket counts (acq_rel at GPU scope), so the
        # program that takes the last ticket sees all of them (its loads volatile: not from a stale L1 line).
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + pn, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for j in range(SPLIT_K):
                total += tl.load(part_ptr + j * BLOCK_M * N + tile, mask=mask, other=0.0, volatile=True)
            tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr + pn, 0)


def fp8_weight_mm(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x (M, K) · Wᵀ for W (N, K) held in e4m3 with 128×128 block scales ws (ceil(N/128), ceil(K/128)):
    weight-only FP8 at inference (x keeps its dtype, as does y), fp32 accumulation. A Triton kernel on the GPU (up
    to 16 rows, with SPLIT_K_WAVES, the reduction split over enough programs to fill the GPU); elsewhere W is
    dequantized (in fp32, then rounded once to x's dtype) for an ordinary matmul."""
    if not use_triton(x):
        return F.linear(x, dequantize_blocks(wq, ws).to(x.dtype))
    return _w8_mm_op(x, wq, ws)


# Launch settings: (BLOCK_M, BLOCK_N, num_warps) for up to 16 rows (decode) and for more. BLOCK_N divides 128.
W8_MM = {"few": (16, 32, 4), "many": (64, 128, 8)}
# Split the few-rows reduction until the kernel has this many programs per SM; 0: never split. Off until timed on
# a GPU (python -m benchmarks.fp8.weight_gemm compares both forms; docs/fp8.md#fp8-inference-weights).
SPLIT_K_WAVES = 0


_tickets: dict[tuple, torch.Tensor] = {}  # per weight: the split-K kernel's counters, one per output block


def _weight_tickets(wq: torch.Tensor, n_blocks: int) -> torch.Tensor | None:
    """The int32 counters of this weight's split-K calls: zeros, left at zero by every call. Made on the weight's
    first call; never while a CUDA graph records (the zeros would be the graph's to re-make): then None, and the
    call takes the kernel that does not split."""
    key = (wq.device, wq.data_ptr(), n_blocks)
    if key not in _tickets and not (wq.is_cuda and torch.cuda.is_current_stream_capturing()):
        _tickets[key] = torch.zeros(n_blocks, dtype=torch.int32, device=wq.device)
    return _tickets.get(key)


def _split(n_blocks: int, K: int, device) -> tuple[int, int]:
    """(SPLIT_K, k_per_split): reduction slices of whole 128-blocks, enough of them for SPLIT_K_WAVES programs per
    SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    k_blocks = triton.cdiv(K, 128)
    per = triton.cdiv(k_blocks, min(k_blocks, max(1, triton.cdiv(SPLIT_K_WAVES * sms, n_blocks))))
    return triton.cdiv(k_blocks, per), per * 128


@torch.library.custom_op("dsv3::fp8_weight_mm", mutates_args=())
def _w8_mm_op(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    (M, K), N = x.shape, wq.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    wq, ws = wq.contiguous(), ws.float().contiguous()
    y = x.new_empty(M, N)
    bm, bn, warps = W8_MM["few" if M <= 16 else "many"]
    tickets = _weight_tickets(wq, triton.cdiv(N, bn)) if SPLIT_K_WAVES and 0 < M <= bm else None
    if tickets is not None:
        split, k_per_split = _split(triton.cdiv(N, bn), K, x.device)
        part = torch.empty(split * bm * N if split > 1 else 1, dtype=torch.float32, device=x.device)
        _w8_splitk_kernel[(triton.cdiv(N, bn), split)](x, wq, ws, y, part, tickets, M, N, K, x.stride(0),
                                                        y.stride(0), ws.stride(0), k_per_split, SPLIT_K=split,
                                                        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    elif M:
        _w8_mm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](x, wq, ws, y, M, N, K, x.stride(0), y.stride(0),
                                                                 ws.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                                                                 num_warps=warps)
    return y


@_w8_mm_op.register_fake
def _(x, wq, ws):
    return x.new_empty(x.shape[0], wq.shape[0])
