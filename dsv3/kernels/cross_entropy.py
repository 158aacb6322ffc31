"""Cross-entropy over a large vocabulary without an fp32 copy of the logits.

`F.cross_entropy(logits.float(), labels)` makes several full (N, V) passes and buffers: the fp32 copy, the
log-softmax output, a zero-filled gradient for the scatter and the log-softmax backward. Here the forward keeps only
the per-row log-sum-exp (fp32) and the backward writes softmax − one-hot straight into a gradient of the logits'
dtype. On a GPU each is one fused kernel (torch.compile): the eager chunked version below cost a large share of a
16b-slice step (16K tokens × 102,400 vocab; measured: docs/training.md). Elsewhere (CPU, or fp64) the same math
runs eagerly in row chunks, so the fp32 temporaries stay cache-sized. Rows whose label is `ignore_index` get 0 loss
and 0 gradient.
"""
from __future__ import annotations

import functools

import torch


def _logsumexp(logits_NV, acc):
    return torch.logsumexp(logits_NV.to(acc), dim=-1)


def _grad(logits_NV, lse_N, target_N, scale_N):
    onehot = torch.arange(logits_NV.shape[1], device=logits_NV.device) == target_N[:, None]
    p = torch.exp(logits_NV.to(lse_N.dtype) - lse_N[:, None]) - onehot.to(lse_N.dtype)
    return (p * scale_N[:, None]).to(logits_NV.dtype)


@functools.cache
def _compiled():
    return torch.compile(_logsumexp, dynamic=True), torch.compile(_grad, dynamic=True)


def _fused(logits: torch.Tensor) -> bool:
    return logits.is_cuda and logits.dtype != torch.float64


def _chunks(n_rows: int, n_cols: int):
    step = max(1, (1 << 20) // n_cols)  # ~1M elements per chunk
    return (slice(s, s + step) for s in range(0, n_rows, step))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, labels_N, ignore_index):
        acc = torch.promote_types(logits_NV.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        valid = labels_N != ignore_index
        target = torch.where(valid, labels_N, 0)
        if _fused(logits_NV):
            lse = _compiled()[0](logits_NV, acc)
        else:
            lse = torch.empty(logits_NV.shape[0], device=logits_NV.device, dtype=acc)
            for rows in _chunks(*logits_NV.shape):
                lse[rows] = _logsumexp(logits_NV[rows], acc)
        picked = logits_NV.gather(1, target[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits_NV, target, valid, lse)
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, target, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_N.to(lse.dtype), 0.0)
        if _fused(logits_NV):
            return _compiled()[1](logits_NV, lse, target, scale), None, None
        grad = torch.empty_like(logits_NV)
        for rows in _chunks(*logits_NV.shape):
            out = grad[rows]
            p = out if out.dtype == lse.dtype else torch.empty_like(out, dtype=lse.dtype)
            torch.sub(logits_NV[rows], lse[rows, None], out=p).exp_()  # in place: no extra temporaries
            p[torch.arange(p.shape[0], device=p.device), target[rows]] -= 1.0
            p.mul_(scale[rows, None])
            if p is not out:
                out.copy_(p)
        return grad, None, None


def cross_entropy(logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row negative log-likelihood, (N,), in fp32 (fp64 for fp64 logits): what
    `F.cross_entropy(logits.float(), labels, reduction="none")` returns, for logits of any float dtype."""
    if logits_NV.dim() != 2 or labels_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"cross_entropy wants logits (N, V) and labels (N,), got {tuple(logits_NV.shape)} "
                         f"and {tuple(labels_N.shape)}")
    return _CrossEntropy.apply(logits_NV, labels_N, ignore_index)
