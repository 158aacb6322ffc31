"""Rotary position embedding on the decoupled rope dims, with YaRN (docs/architecture.md#rope-layout,
docs/architecture.md#yarn).

We follow transformers' reading of the config where it differs from the official code
(docs/architecture.md#yarn): YaRN is on iff `rope_scaling.type == "yarn"`; cos/sin carry `attention_factor`; the
logit multiplier m² comes from `mscale_all_dim`. With both `mscale` keys present (every DeepSeek config) the two
readings agree.
"""
from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(Dr/2,) fp32 inverse frequencies, YaRN-blended when configured."""
    d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    base = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if cfg.rope_type != "yarn":
        return base
    rs = cfg.rope_scaling
    factor, L0 = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rotations):  # dim index whose wavelength completes `rotations` turns within L0
        return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 keeps the original (high-frequency) dims, ramp 1 interpolates them by 1/factor.
    return base / factor * ramp + base * (1 - ramp)


def attention_factor(cfg: ModelConfig) -> float:
    """Multiplier on cos/sin (1.0 for DeepSeek configs, which carry mscale == mscale_all_dim)."""
    if cfg.rope_type != "yarn":
        return 1.0
    rs = cfg.rope_scaling
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return _yarn_mscale(rs["factor"], rs["mscale"]) / _yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    return _yarn_mscale(rs["factor"])


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_type == "yarn" and cfg.rope_scaling.get("mscale_all_dim"):
        m = _yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"])
        scale *= m * m  # V3: 192^-0.5 · 1.8738542 = 0.1352338
    return scale


def cos_sin(positions: torch.Tensor, inv_freq_: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (...,) -> cos, sin (..., Dr/2) in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq_
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (..., Dr) by angles whose cos/sin (..., Dr/2) broadcast against x's leading dims.

    interleave=True: pairs (x[2j], x[2j+1]) as DeepSeek checkpoints store them; the result stays interleaved
    (official layout; transformers writes half-split order instead, which gives the same q·k).
    interleave=False: NeoX rotate-half pairs (x[j], x[j + Dr/2]).
    The rotation runs in fp32 and is cast back (official precision).
    """
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
