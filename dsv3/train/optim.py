"""AdamW with weight decay on matrices only, and the learning-rate and MTP-weight schedules."""
from __future__ import annotations

import math

import torch

from dsv3.model import Transformer
from dsv3.train.config import TrainConfig


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices (linears, embedding, stacked experts); never norms. Balance biases are buffers, not params.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio·lr, or warmup-stable-decay (linear decay at the end)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    t = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr + (floor - cfg.lr) * min(t, 1.0)


def mtp_lambda_at(step: int, cfg: TrainConfig) -> float:
    """V3: λ = 0.3 for the first 10T of 14.8T tokens, then 0.1."""
    return cfg.mtp_lambda if step < cfg.mtp_lambda_switch * cfg.steps else cfg.mtp_lambda_final

