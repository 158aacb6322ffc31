"""AdamW with weight decay on matrices only, and the learning-rate and MTP-weight schedules."""
from __future__ import annotations

import math

import torch

from dsv3.model import Transformer
from dsv3.train.config import OptimConfig, TrainConfig


def build_optimizer(model: Transformer, optim: OptimConfig) -> torch.optim.Optimizer:
    # Decay matrices (linears, embedding, stacked experts); never norms. Balance biases are buffers, not params.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    betas = (optim.beta1, optim.beta2)
    if optim.moments_dtype == "bf16":
        return AdamWBF16Moments(groups, lr=optim.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, fused=params[0].is_cuda)


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (torch's update rule) whose two moments are stored in bf16, as DeepSeek-V3 trained (DeepSeek-V3
    report §3.3): 4 bytes per parameter instead of 8. Each step reads them into fp32, updates, and rounds them
    back; the parameter update itself is fp32 on the master weights."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t = st["step"].item()
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))


def lr_at(step: int, optim: OptimConfig, steps: int) -> float:
    """Linear warmup, then cosine to min_lr_ratio·lr at `steps`, or warmup-stable-decay (linear decay at the end)."""
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        t = (step - optim.warmup) / max(1, steps - optim.warmup)
        return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    decay_start = int(steps * (1 - optim.decay_fraction))
    if step < decay_start:
        return optim.lr
    t = (step - decay_start) / max(1, steps - decay_start)
    return optim.lr + (floor - optim.lr) * min(t, 1.0)


def mtp_lambda_at(step: int, cfg: TrainConfig) -> float:
    """V3: λ = 0.3 for the first 10T of 14.8T tokens, then 0.1."""
    return cfg.mtp_lambda if step < cfg.mtp_lambda_switch * cfg.steps else cfg.mtp_lambda_final

