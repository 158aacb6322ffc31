"""The GRPO objective (docs/post-training.md#grpo-objective): group-normalised advantages and the clipped,
KL-regularised policy loss.

Pure functions of tensors, so the tests can check them in float64 against a hand evaluation and against TRL.
Shapes: N sampled completions (contiguous groups of G per prompt), T completion positions (right-padded).

Reward scaling (`group` / `batch` / `none`) and aggregation (`grpo` / `dapo` / `dr_grpo`) are independent
fields, as in TRL; Dr. GRPO is `dr_grpo` aggregation with `none` scaling. Conventions of TRL for parity: the std
has Bessel's correction plus 1e-4, the KL is the k3 estimator added outside the min/clip, and a batch split into
minibatches passes the whole batch's sequence / token counts so the minibatch losses add up to the batch loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards_N: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Â_i = (r_i − mean of i's group) / (std + eps); the std of the group, of the whole batch, or none.

    A group whose rewards are all equal gets Â = 0 exactly (0 / (0 + eps)), never NaN.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} must be one of {SCALES}")
    if group_size < 2 or rewards_N.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {rewards_N.numel()} rewards")
    r_NG = rewards_N.view(-1, group_size)
    adv_NG = r_NG - r_NG.mean(1, keepdim=True)
    if scale == "group":
        adv_NG = adv_NG / (r_NG.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv_NG = adv_NG / (rewards_N.std() + eps)
    return adv_NG.flatten()


def policy_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv_N: Tensor, mask_NT: Tensor, *,
                ref_logp_NT: Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
                aggregation: str = "grpo", max_completion_length: int | None = None,
                num_sequences: int | None = None, num_tokens: float | None = None) -> tuple[Tensor, dict]:
    """L_it = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) + β·k3, aggregated as `aggregation` says.

    ρ = π_θ/π_old per token; k3 = π_ref/π_θ − log(π_ref/π_θ) − 1. `num_sequences` / `num_tokens` default to
    this call's rows / masked tokens; `max_completion_length` (dr_grpo) to T. Returns the loss and the clip
    ratios (and the mean KL when β ≠ 0) as floats.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    if beta and ref_logp_NT is None:
        raise ValueError(f"beta={beta} needs the reference model's log-probs (ref_logp_NT)")
    keep = mask_NT.bool()
    mask = keep.to(logp_NT.dtype)
    adv = adv_N.to(logp_NT.dtype).unsqueeze(1)  # (N, 1): outcome supervision, one advantage per sequence
    ratio = torch.exp(logp_NT - old_logp_NT)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics = {}
    n_tok = mask.sum().clamp(min=1)
    if beta:
        d = ref_logp_NT - logp_NT
        k3 = torch.exp(d) - d - 1
        per_token = per_token + beta * k3
        metrics["kl"] = float((k3.detach() * mask).sum() / n_tok)
    with torch.no_grad():
        metrics["clip_low"] = float((((ratio < 1 - eps_low) & (adv < 0)) * mask).sum() / n_tok)
        metrics["clip_high"] = float((((ratio > 1 + eps_high) & (adv > 0)) * mask).sum() / n_tok)
    n_seq = num_sequences or logp_NT.shape[0]
    masked = torch.where(keep, per_token, 0.0)  # padding may hold anything, even -inf log-probs
    if aggregation == "grpo":  # mean over sequences of each sequence's token mean
        loss = (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seq
    elif aggregation == "dapo":  # every token of the generation batch weighs the same
        loss = masked.sum() / (num_tokens or mask.sum().clamp(min=1))
    else:  # dr_grpo: a constant normaliser, no length bias
        loss = masked.sum() / (n_seq * (max_completion_length or logp_NT.shape[1]))
    return loss, metrics
