"""Grouped GEMM for routed experts: rows of x sorted by expert, one weight matrix per expert.

Fast path: `torch._grouped_mm` (CUTLASS grouped GEMM on Hopper in bf16; a native CPU implementation in fp32 /
bf16). Reference: one matmul per group over contiguous row slices — exact, and used for dtypes or devices the
fused op does not take (fp64; fp32 on CUDA).
"""
from __future__ import annotations

import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (N, Din) rows grouped by expert; w (E, Din, Dout); offs (E,) int32 cumulative group ends -> (N, Dout)."""
    ends = offs.tolist()  # host sync: fine for a reference path
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


def _fused_ok(x: torch.Tensor) -> bool:
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


# torch.compile's shape function for _grouped_mm only admits bf16 (the CUDA contract), so on CPU the op runs
# outside the compiled graph.
_grouped_mm_cpu = torch.compiler.disable(torch._grouped_mm)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know this op: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif w.dtype != x.dtype:
        w = w.to(x.dtype)
    if x.shape[0] == 0:  # no rows, but still a node over x and w: an expert-parallel rank that received no rows
        return x @ w[0]  # must run the backward's collectives (reached through it) like its peers, or they hang
    if _fused_ok(x):
        return (torch._grouped_mm if x.is_cuda else _grouped_mm_cpu)(x, w, offs=offs)
    return grouped_mm_reference(x, w, offs)
