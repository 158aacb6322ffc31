"""DeepSeek's FP8 block format (docs/fp8.md#checkpoint-format): e4m3 weights with one fp32 scale per 128×128 block.

`weight_scale_inv[i, j]` is *multiplied* (it is amax/448 of the original block). The grid is
ceil(rows/128) × ceil(cols/128); ragged edge blocks (576 = 4·128 + 64 rows of kv_a_proj_with_mqa) use their own
scale over the rows that exist. transformers derives the block size as rows // scale_rows and gets these wrong.
"""
from __future__ import annotations

import math

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_grid(shape) -> tuple[int, int]:
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


def _expand(scale: torch.Tensor, shape) -> torch.Tensor:
    """(..., ceil(O/128), ceil(I/128)) -> (..., O, I), each block's scale repeated over the rows/cols it covers."""
    O, I = shape[-2:]
    return scale.repeat_interleave(BLOCK, -2)[..., :O, :].repeat_interleave(BLOCK, -1)[..., :I]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(..., O, I) e4m3 with (..., ceil(O/128), ceil(I/128)) block scales -> values in dtype (computed in it)."""
    return q.to(dtype) * _expand(scale.to(dtype), q.shape)


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16, name: str = "weight") -> torch.Tensor:
    if w.dim() != 2 or tuple(scale_inv.shape) != scale_grid(w.shape):
        raise ValueError(f"{name}: scale grid {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"(expected {scale_grid(w.shape)} for 128×128 blocks)")
    return dequantize_blocks(w, scale_inv).to(dtype)


def quantize(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, I) -> e4m3 (O, I) and fp32 scale_inv (ceil(O/128), ceil(I/128)); amax/448 per block.

    ue8m0 rounds each scale up to a power of two (DeepSeek-V3.1 checkpoints), so no value overflows.
    """
    O, I = w.shape
    gO, gI = scale_grid(w.shape)
    padded = torch.zeros(gO * BLOCK, gI * BLOCK, dtype=torch.float32, device=w.device)
    padded[:O, :I] = w.float()  # zero padding never raises a block's amax
    amax = padded.view(gO, BLOCK, gI, BLOCK).abs().amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (w.float() / _expand(scale, w.shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale
