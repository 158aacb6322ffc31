import torch
from torch import nn


class RMSNorm(nn.Module):
    """w ⊙ x / sqrt(mean(x²) + eps), normalised in fp32 and cast back before the weight (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
