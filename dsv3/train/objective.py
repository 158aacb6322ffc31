"""The pretraining objective: next-token loss, the MTP loss (docs/architecture.md#multi-token-prediction), and
the balancing rules (docs/architecture.md#auxiliary-loss-free-balancing, #sequence-wise-balance-loss)."""
from __future__ import annotations

import torch

from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.model import Transformer


def next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (computed in fp32) over all positions."""
    return cross_entropy(logits_BTV.flatten(0, 1), labels_BT.flatten()).mean()


def mtp_loss(mtp_logits: list[torch.Tensor], labels_BT: torch.Tensor) -> torch.Tensor:
    """(1/D) Σ_k L^k with L^k = −(1/T) Σ_i log P^k_i[t_{i+k+1}] (eq. 24–25), averaged over the batch.

    Depth k's logits at position i (i < T−k) predict labels[i+k]; note the 1/T, not 1/(T−k), as in the paper.
    λ is applied by the caller.
    """
    B, T = labels_BT.shape
    total = 0.0
    for k, logits in enumerate(mtp_logits, start=1):
        nll = cross_entropy(logits.flatten(0, 1), labels_BT[:, k:].flatten()).sum()
        total = total + nll / (B * T)
    return total / len(mtp_logits)


@torch.no_grad()
def update_balance_bias(model: Transformer, counts_LE: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (docs/architecture.md#auxiliary-loss-free-balancing):
    b_i += γ·sign(mean_j c_j − c_i), counts over the global batch."""
    for moe, counts_E in zip(model.moe_layers(), counts_LE):
        c = counts_E.float()
        moe.gate.e_score_correction_bias += rate * torch.sign(c.mean() - c)


def max_violation(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per MoE layer = max load / mean load − 1 (Wang et al.)."""
    c = counts_LE.float()
    return c.amax(-1) / c.mean(-1) - 1


def set_balance_loss(model: Transformer, coef: float) -> None:
    """Weight of the sequence-wise balance loss each MoE layer attaches in its backward (0 = off)."""
    for moe in model.moe_layers():
        moe.balance_coef = coef
