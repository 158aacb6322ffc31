"""Scaled dot-product attention whose values are narrower than its queries and keys (MLA: Dv < Dn + Dr).

Reference and fast paths are PyTorch's own `scaled_dot_product_attention` backends; what this file chooses is how
to hand them V. On Hopper the cuDNN backend takes V's narrower head dim as is, which is faster than padding V
for the flash kernel. On a CPU only the flash kernel handles masks without materializing the (T, S) scores, and
it wants V padded to Q's width (both measured: docs/training.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, Dq), k (B, H, S, Dq), v (B, H, S, Dv) -> (B, H, T, Dv). mask: None for causal attention, else a
    bool mask broadcasting to (B, H, T, S), True = attend."""
    dv = v.shape[-1]
    pad = q.shape[-1] - dv if q.device.type == "cpu" else 0
    v = F.pad(v, (0, pad)) if pad > 0 else v
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[..., :dv]
