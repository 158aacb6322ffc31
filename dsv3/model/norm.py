import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """w ⊙ x / sqrt(mean(x²) + eps), normalised in fp32 and cast back before the weight (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
