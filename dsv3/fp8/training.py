"""FP8 mixed-precision training (DeepSeek-V3 report §3.3, docs/fp8.md#training-recipe): `apply_fp8(model)` converts
a built model in place.

Every GEMM of the decoder layers' linears and routed experts runs in E4M3 with fp32 accumulation:

    Fprop  y  = x · Wᵀ      x: 1×128 tiles along K            W: 128×128 blocks
    Dgrad  dx = dy · W      dy: 1×128 tiles along N           W: the same blocks, transposed
    Wgrad  dW = dyᵀ · x     dyᵀ, xᵀ: 1×128 tiles along tokens (never 128×128 for activation gradients)

Scales are computed online from the current amax (no delayed scaling). Forward saves xᵀ in FP8 for Wgrad,
not x. What stays high precision: embedding, output head, MoE router, norms, the attention core, MTP's eh_proj;
master weights and gradients keep their dtype (fp32 by default). The conversion swaps the class of
nn.Linear / Experts modules for subclasses with an FP8 forward: parameters, state-dict keys and checkpoints
do not change, so an FP8 run saves, resumes and exports like any other.

Routed experts: rows are dispatched to a buffer where every expert's rows start at a multiple of 128 (zero
rows pad each group), so no 1×128 tile straddles two experts along the token dim, and the grouped GEMMs of
`dsv3.fp8.grouped` run without a host sync (the buffer has a static upper-bound size); groups of
CUBLAS_ROWS rows or more on average go to cuBLAS per expert instead, after one sync for the group ends.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.fp8.format import BLOCK
from dsv3.fp8.gemm import fp8_mm
from dsv3.fp8.grouped import grouped_fp8_mm, grouped_fp8_mm_wgrad
from dsv3.fp8.quantize import quantize_blocks, quantize_rows
from dsv3.model.moe import Experts


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ue8m0: bool):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs, xtq, xts = quantize_rows(x2, ue8m0, both=True)
        wq, ws, wqt = quantize_blocks(w, ue8m0, transposed=True)
        y = fp8_mm(xq, xs, wq, ws, True, x.dtype)
        ctx.save_for_backward(xtq, xts, wqt, ws)
        ctx.ue8m0, ctx.x_dtype, ctx.w_dtype = ue8m0, x.dtype, w.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wqt, ws = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        gq, gs, gtq, gts = quantize_rows(dy2, ctx.ue8m0, both=True)
        dx = fp8_mm(gq, gs, wqt, ws.t(), True, ctx.x_dtype)
        dw = fp8_mm(gtq, gts, xtq, xts, False, torch.float32).to(ctx.w_dtype)
        return dx.view(*dy.shape[:-1], -1), dw, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (see the module docstring); output in the autocast dtype."""
    ue8m0 = False

    def forward(self, x):
        dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = _Fp8Linear.apply(x.to(dtype), self.weight, self.ue8m0)
        return y if self.bias is None else y + self.bias.to(dtype)


class _Fp8GroupedMM(torch.autograd.Function):
    """x (R, K) rows grouped by expert at 128-aligned offsets, w (E, N, K) → (R, N) = x_e · w_eᵀ per group."""

    @staticmethod
    def forward(ctx, x, w, offs, ue8m0: bool):
        xq, xs, xtq, xts = quantize_rows(x, ue8m0, both=True)
        wq, ws, wqt = quantize_blocks(w, ue8m0, transposed=True)
        y = grouped_fp8_mm(xq, xs, wq, ws, offs, x.dtype)
        ctx.save_for_backward(xtq, xts, wqt, ws, offs)
        ctx.ue8m0, ctx.x_dtype, ctx.w_dtype = ue8m0, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, wqt, ws, offs = ctx.saved_tensors
        gq, gs, gtq, gts = quantize_rows(dy.contiguous(), ctx.ue8m0, both=True)
        dx = grouped_fp8_mm(gq, gs, wqt, ws.transpose(1, 2).contiguous(), offs, ctx.x_dtype)
        dw = grouped_fp8_mm_wgrad(gtq, gts, xtq, xts, offs, torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None


class Fp8Experts(Experts):
    ue8m0 = False

    def forward(self, x_ND, w_NK, idx_NK):
        N, K = idx_NK.shape
        E = self.gate_up_proj.shape[0]
        dtype = _out_dtype(x_ND)
        flat = idx_NK.flatten()
        counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)  # (token, expert) rows sorted by expert
        padded_E = (counts_E + BLOCK - 1) // BLOCK * BLOCK
        start_E, pstart_E = counts_E.cumsum(0) - counts_E, padded_E.cumsum(0) - padded_E
        e_sorted = flat[order]
        dest = pstart_E[e_sorted] + torch.arange(flat.numel(), device=flat.device) - start_E[e_sorted]
        rows = -(-(flat.numel() + E * (BLOCK - 1)) // BLOCK) * BLOCK  # static bound on the padded row count
        offs = padded_E.cumsum(0).to(torch.int32)
        with torch.autocast(x_ND.device.type, enabled=False):
            x_pad = x_ND.new_zeros(rows, x_ND.shape[-1], dtype=dtype).index_copy(0, dest, x_ND[order // K].to(dtype))
            w_pad = x_pad.new_zeros(rows).index_copy(0, dest, w_NK.flatten()[order].to(dtype))
            gate, up = _Fp8GroupedMM.apply(x_pad, self.gate_up_proj, offs, self.ue8m0).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up * w_pad.unsqueeze(-1)
            y_sorted = _Fp8GroupedMM.apply(h, self.down_proj, offs, self.ue8m0)[dest]
        y_NKD = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted).view(N, K, -1)
        return y_NKD.sum(1, dtype=torch.float32).to(dtype), counts_E


HIGH_PRECISION = ("lm_head", "eh_proj")  # and everything that is not an nn.Linear or Experts (router, norms)
# A linear with a side under this stays bf16: on an H100 its FP8 GEMMs plus the quantization of their inputs
# were slower than bf16 (measured: docs/fp8.md#fp8-training). So does one with a side that is not a multiple of
# 128: cuBLAS's block-scaled GEMM needs the reduction dim in whole 128-blocks (Dgrad reduces over the output
# features), and the emulation is far slower.
MIN_FP8_DIM = 1024


def apply_fp8(model: nn.Module, experts: bool = True, ue8m0: bool = False, min_dim: int = MIN_FP8_DIM) -> dict:
    """Convert the decoder's linears (and, with `experts`, the routed experts) to FP8 in place. -> counts."""
    n = {"linears": 0, "experts": 0, "kept_bf16": 0}
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in HIGH_PRECISION:
            if min_dim and (min(m.in_features, m.out_features) < min_dim or m.in_features % 128
                            or m.out_features % 128):  # min_dim=0: every one (CPU studies, tests)
                n["kept_bf16"] += 1
                continue
            m.__class__, m.ue8m0 = Fp8Linear, ue8m0
            n["linears"] += 1
        elif type(m) is Experts and experts:
            m.__class__, m.ue8m0 = Fp8Experts, ue8m0
            n["experts"] += 1
    return n
