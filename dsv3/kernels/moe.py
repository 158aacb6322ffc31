"""Routed experts: each token's K (token, expert) rows through their experts' SwiGLU, scaled by the routing
weights and summed per token (DeepSeek-V3 report §2.1.2; docs/architecture.md#experts).

    y_t = Σ_k w_tk · down_e(silu(gate_e(x_t)) ⊙ up_e(x_t)),    e = idx_tk

`routed_experts` is the one public function; it picks among:
  - the Triton decode kernels (kernels/moe_decode.py): inference on a GPU while experts have few rows each, or
    whenever the weights are e4m3 with block scales (FP8 weights at inference, dsv3/fp8/inference.py). One
    token's rows go in unsorted; more rows sorted by expert;
  - two batched matmuls over each expert's rows padded to the largest count: inference on a CPU, few rows;
  - otherwise the grouped GEMM (kernels/grouped_mm.py) over the rows sorted by expert (`grouped_swiglu`, the
    reference of the others): no loop over experts, no capacity factor, no token dropping.
Rows are sorted by a counting sort while the batch is decode-sized (no sort kernels), else by a stable argsort:
the same permutation either way, so results do not depend on the path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.kernels import moe_decode
from dsv3.kernels.grouped_mm import grouped_mm

COUNTING_SORT_MAX = 1 << 16  # (token, expert) rows x experts up to which rows are ordered by a counting sort


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over experts in fp32 at least (bf16 inputs), in float64 for float64 (tests)."""
    return torch.promote_types(dtype, torch.float32)


def _sum_experts(y_NKD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's K expert outputs summed with fp32 accumulation, in a fixed order (deterministic)."""
    return y_NKD.sum(1, dtype=accumulation_dtype(dtype)).to(dtype)


def grouped_swiglu(x_sorted, w_sorted, offs, gate_up_proj, down_proj):
    """SwiGLU of each expert over its rows (sorted by expert, group ends `offs` (E,) int32), scaled by the routing
    weights w_sorted: x_sorted (R, D), gate_up_proj (E, 2F, D) gate rows first, down_proj (E, D, F) -> (R, D)."""
    gate, up = grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
    # The routing weight scales the activation before the (linear) down projection: same result, and it
    # fuses into the SwiGLU elementwise instead of a pass over the (N·K, D) output.
    h = F.silu(gate) * up * w_sorted.unsqueeze(-1).to(up.dtype)
    return grouped_mm(h, down_proj.transpose(1, 2), offs)  # (rows, D)


Ffn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def routed_experts(x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ffn: Ffn = grouped_swiglu) -> tuple[torch.Tensor, torch.Tensor]:
    """x_ND (N, D) tokens, w_NK / idx_NK (N, K) routing weights and experts, gate_up_proj (E, 2F, D) (gate rows
    first), down_proj (E, D, F) -> y_ND (N, D), and tokens per expert counts_E (E,).

    `scales`: the two weights are e4m3 with these 128×128 block scales, (E, ⌈2F/128⌉, ⌈D/128⌉) and
    (E, ⌈D/128⌉, ⌈F/128⌉): only the Triton kernels take them (`moe_decode.usable(..., fp8=True)`).
    `ffn`: the grouped SwiGLU over sorted rows (an Experts subclass may pad the groups: benchmarks/bench_fp8.py)."""
    N, K = idx_NK.shape
    E = gate_up_proj.shape[0]
    flat = idx_NK.flatten()  # (N·K,) each row's expert
    triton_ffn = moe_decode.usable(x_ND, flat.numel(), E, fp8=scales is not None)
    if scales is not None and not triton_ffn:
        raise ValueError("e4m3 expert weights run only in the Triton kernels (inference on a GPU): dequantize them")
    # One token (decode at batch 1): the kernels pick each expert's rows out of `flat`, no sort. (On N alone:
    # a torch.compile for N >= 2 then takes no guard on N here, and serves every batch size.)
    if triton_ffn and N == 1 and K <= moe_decode.FEW:
        counts_E = F.one_hot(flat, E).sum(0)
        y_NKD = moe_decode.moe_ffn(x_ND, gate_up_proj, down_proj, flat, w_NK.flatten(), K, scales=scales)
        return _sum_experts(y_NKD.view(N, K, -1), x_ND.dtype), counts_E
    if flat.numel() * E <= COUNTING_SORT_MAX:  # decode-sized: a counting sort, no sort kernels
        onehot = F.one_hot(flat, E)  # (N·K, E)
        counts_E = onehot.sum(0)
        rank = onehot.cumsum(0).gather(1, flat[:, None])[:, 0] - 1  # earlier rows of the same expert
        if x_ND.device.type == "cpu" and not triton_ffn and not torch.is_grad_enabled():
            m = int(counts_E.max())
            if m * E <= 4 * flat.numel():  # padding at most quadruples the rows
                return _padded(x_ND, w_NK, flat * m + rank, m, gate_up_proj, down_proj), counts_E
        dest = (counts_E.cumsum(0) - counts_E)[flat] + rank
        order = torch.empty_like(flat).scatter_(0, dest, torch.arange(flat.numel(), device=flat.device))
    else:
        # scatter_add, not bincount: a static output shape keeps torch.compile from breaking the graph here.
        counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        dest = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    # `order`: rows sorted by expert, stably (the same permutation either way: deterministic); `dest` its inverse
    offs, w_sorted = counts_E.cumsum(0).to(torch.int32), w_NK.flatten()[order]
    if triton_ffn:
        y_sorted = moe_decode.moe_ffn(x_ND, gate_up_proj, down_proj, order, w_sorted, K, offs, scales)
    else:
        y_sorted = ffn(x_ND[order // K], w_sorted, offs, gate_up_proj, down_proj)
    return _sum_experts(y_sorted[dest].view(N, K, -1), x_ND.dtype), counts_E


def _padded(x_ND, w_NK, pos, m, gate_up_proj, down_proj):
    """CPU inference, few rows: each expert's rows padded to the largest count `m` (row p of (token, expert) pairs
    at `pos[p]`), then two batched matmuls. oneDNN's grouped GEMM runs one matmul per expert at a fixed cost
    however small, a batched matmul all of them at once (measured: docs/inference.md#cpu-engine)."""
    (N, K), (E, _, D) = w_NK.shape, gate_up_proj.shape
    x = x_ND.new_zeros(E * m, D).index_copy_(0, pos, x_ND.repeat_interleave(K, 0))
    w = x_ND.new_zeros(E * m).index_copy_(0, pos, w_NK.flatten().to(x_ND.dtype))
    gate, up = torch.bmm(x.view(E, m, D), gate_up_proj.transpose(1, 2).to(x.dtype)).chunk(2, dim=-1)
    h = F.silu(gate) * up * w.view(E, m, 1)
    y = torch.bmm(h, down_proj.transpose(1, 2).to(x.dtype)).view(E * m, D)[pos].view(N, K, D)
    return _sum_experts(y, x_ND.dtype)
