"""Projections of the same input as one GEMM at inference: a decode step is bound by its kernel count, not bytes."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fuse_rows(fused: torch.Tensor | None, *linears: nn.Linear) -> torch.Tensor:
    """One (Σ out, in) matrix holding these bias-free layers' weights as consecutive row blocks; each layer's weight
    (the same Parameter object) comes to share its block's memory, so nothing is stored twice and in-place updates
    (an optimizer step, a load_state_dict) reach both; checkpoints write them as before. Training leaves the layers
    separate (modules use the fused matrix only without autograd). Call it once the model sits on its device and
    dtype: moving the model afterwards would part the two. Returns `fused` itself when the layers still share it,
    and None when a layer is not a plain nn.Linear (FP8 weights at inference: dsv3/fp8/inference.py)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    first = linears[0].weight
    if fused is not None and first.data_ptr() == fused.data_ptr() and first.device == fused.device:
        return fused
    fused = torch.cat([m.weight for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row:row + n]  # the same Parameter object: an optimizer built before still holds it
        row += n
    return fused
