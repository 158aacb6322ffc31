"""DeepSeekMoE (SPEC §6, §9): fine-grained routed experts + shared experts, every gate variant.

Routed experts run as one grouped GEMM over the N·K (token, expert) rows sorted by expert: no loop over
experts, no capacity factor, no token dropping. The sequence-wise balance loss (§9.2) enters through autograd
right here (`_AttachLoss`), so it reaches the router even when layers run in pipeline stages that pass only
hidden states between them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import moe_decode
from dsv3.kernels.grouped_mm import grouped_mm
from dsv3.model.fuse import fuse_rows


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up: torch.Tensor | None = None  # set by fuse_projections()

    def forward(self, x):
        if self.gate_up is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """Inference: gate and up as one GEMM (see `fuse_rows`)."""
        self.gate_up = fuse_rows(self.gate_up, self.gate_proj, self.up_proj)


class Gate(nn.Module):
    """Router: affinities in fp32, group-limited top-k selection, weights from the unbiased scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.scoring, self.norm = cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            # Aux-loss-free balancing bias (§9.1): selection only, never trained by gradients, kept in fp32.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor):
        N, E = x_ND.shape[0], self.weight.shape[0]
        with torch.autocast(x_ND.device.type, enabled=False):  # routing decisions in fp32, also under autocast
            if torch.compiler.is_compiling() and N <= 256:
                # Decode: a reduction that Inductor fuses with the weight's cast and the scoring below (cuBLAS ran
                # this GEMV as two kernels, after a third that cast the weight).
                logits_NE = (x_ND.float().unsqueeze(1) * self.weight.float()).sum(-1)
            else:
                logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.scoring == "sigmoid" else logits_NE.softmax(-1)
        choice_NE = scores_NE.detach()
        if self.method == "noaux_tc":
            choice_NE = choice_NE + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            choice_NGe = choice_NE.unflatten(-1, (self.n_group, -1))
            # noaux_tc scores a group (a node) by its top-2 sum; V2's group_limited_greedy by its max.
            group_NG = _top2_sum(choice_NGe) if self.method == "noaux_tc" else choice_NGe.amax(-1)
            keep_NG = _rank(group_NG) < self.topk_group
            choice_NE = choice_NGe.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).flatten(1)
        if N * E * E <= RANK_TOPK_MAX:  # decode-sized: ranks by comparison, no sort kernels
            # (N, K): the expert of rank k (argmax of the one-hot: in range even where NaNs leave no rank k)
            is_k = _rank(choice_NE).unsqueeze(1) == torch.arange(self.top_k, device=x_ND.device)[:, None]
            idx_NK = is_k.to(torch.uint8).argmax(-1)
        else:
            idx_NK = choice_NE.topk(self.top_k, dim=-1).indices
        w_NK = scores_NE.gather(1, idx_NK)
        if self.norm:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * self.scale, idx_NK, scores_NE


RANK_TOPK_MAX = 1 << 22  # tokens x experts² up to which a router's top-k is taken by _rank


def _rank(x_NG: torch.Tensor) -> torch.Tensor:
    """Each entry's place in its row in descending order, ties broken by index: the top-k of a row are the entries
    of rank < k. For the few groups of group-limited routing, and the experts of a few tokens, a (G, G)
    comparison beats a topk call (sort kernels: 7% of a bench-684m decode step on an H200) and fuses with the
    routing around it."""
    i = torch.arange(x_NG.shape[-1], device=x_NG.device)
    a, b = x_NG.unsqueeze(-1), x_NG.unsqueeze(-2)  # entry g against every entry h
    return ((b > a) | ((b == a) & (i < i[:, None]))).sum(-1)


def _top2_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values along the last dim (ties count twice, as topk(2) would).

    Two max reductions instead of a topk: 6% of a compiled bench-684m step was spent in topk, and these fuse.
    """
    first = x.amax(-1, keepdim=True)
    second = x.scatter(-1, x.argmax(-1, keepdim=True), float("-inf")).amax(-1, keepdim=True)
    return (first + second).squeeze(-1)


COUNTING_SORT_MAX = 1 << 16  # (token, expert) rows x experts up to which rows are ordered by a counting sort


class Experts(nn.Module):
    """All routed experts of a layer as stacked weights (transformers 5 in-memory layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))  # rows [0, F) gate, [F, 2F) up
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def weight_scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 128×128 block scales of gate_up_proj and down_proj when they are e4m3 (FP8 weights at inference,
        dsv3/fp8/inference.py); None: they are plain weights."""
        return None

    def forward(self, x_ND, w_NK, idx_NK):
        N, K = idx_NK.shape
        w1, w2, scales = self.gate_up_proj, self.down_proj, self.weight_scales()
        E = w1.shape[0]
        flat = idx_NK.flatten()  # (N·K,)
        triton_ffn = moe_decode.usable(x_ND, flat.numel(), E, fp8=scales is not None)
        if scales is not None and not triton_ffn:  # e4m3 weights without the kernels (a CPU): dequantized per call
            from dsv3.fp8.format import dequantize_blocks
            w1, w2 = (dequantize_blocks(w, s).to(x_ND.dtype) for w, s in zip((w1, w2), scales))
        # One token (decode at batch 1): the kernels pick each expert's rows out of `flat`, no sort. (On N alone:
        # a torch.compile for N >= 2 then takes no guard on N here, and serves every batch size.)
        if triton_ffn and N == 1 and K <= moe_decode.FEW:
            counts_E = F.one_hot(flat, E).sum(0)
            y_NKD = moe_decode.moe_ffn(x_ND, w1, w2, flat, w_NK.flatten(), K, scales=scales).view(N, K, -1)
            return y_NKD.sum(1, dtype=accumulation_dtype(x_ND.dtype)).to(x_ND.dtype), counts_E
        if flat.numel() * E <= COUNTING_SORT_MAX:  # decode-sized: a counting sort, no sort kernels
            onehot = F.one_hot(flat, E)  # (N·K, E)
            counts_E = onehot.sum(0)
            rank = onehot.cumsum(0).gather(1, flat[:, None])[:, 0] - 1  # earlier rows of the same expert
            if x_ND.device.type == "cpu" and not triton_ffn and not torch.is_grad_enabled():
                m = int(counts_E.max())
                if m * E <= 4 * flat.numel():  # padding at most quadruples the rows
                    return self._padded(x_ND, w_NK, flat * m + rank, m, w1, w2), counts_E
            dest = (counts_E.cumsum(0) - counts_E)[flat] + rank
            order = torch.empty_like(flat).scatter_(0, dest, torch.arange(flat.numel(), device=flat.device))
        else:
            # scatter_add, not bincount: a static output shape keeps torch.compile from breaking the graph here.
            counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                      torch.ones_like(flat))
            order = flat.argsort(stable=True)
            dest = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
        # `order`: rows sorted by expert, stably (the same permutation either way: deterministic); `dest` its inverse
        offs, w_sorted = counts_E.cumsum(0).to(torch.int32), w_NK.flatten()[order]
        if triton_ffn:
            y_sorted = moe_decode.moe_ffn(x_ND, w1, w2, order, w_sorted, K, offs, scales)
        else:
            y_sorted = self.ffn(x_ND[order // K], w_sorted, offs, w1, w2)
        y_NKD = y_sorted[dest].view(N, K, -1)
        # Sum over each token's K experts with fp32 accumulation; a fixed order keeps it deterministic.
        return y_NKD.sum(1, dtype=accumulation_dtype(x_ND.dtype)).to(x_ND.dtype), counts_E

    def _padded(self, x_ND, w_NK, pos, m, w1, w2):
        """CPU inference, few rows: each expert's rows padded to the largest count `m` (row p of (token, expert)
        pairs at `pos[p]`), then two batched matmuls. oneDNN's grouped GEMM runs one matmul per expert, ~30 µs each
        however small (tiny-576's 128 decode rows over 8 experts: 255 µs a call, a batched matmul 70 µs)."""
        (N, K), (E, _, D) = w_NK.shape, w1.shape
        x = x_ND.new_zeros(E * m, D).index_copy_(0, pos, x_ND.repeat_interleave(K, 0))
        w = x_ND.new_zeros(E * m).index_copy_(0, pos, w_NK.flatten().to(x_ND.dtype))
        gate, up = torch.bmm(x.view(E, m, D), w1.transpose(1, 2).to(x.dtype)).chunk(2, dim=-1)
        h = F.silu(gate) * up * w.view(E, m, 1)
        y = torch.bmm(h, w2.transpose(1, 2).to(x.dtype)).view(E * m, D)[pos].view(N, K, D)
        return y.sum(1, dtype=accumulation_dtype(x_ND.dtype)).to(x_ND.dtype)

    def ffn(self, x_sorted, w_sorted, offs, gate_up_proj=None, down_proj=None):
        """SwiGLU of each expert over its rows (sorted by expert, group ends `offs`), scaled by routing weights;
        of these experts' weights unless others are given (an expert-parallel rank's share)."""
        gate_up_proj = self.gate_up_proj if gate_up_proj is None else gate_up_proj
        down_proj = self.down_proj if down_proj is None else down_proj
        gate, up = grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
        # The routing weight scales the activation before the (linear) down projection: same result, and it
        # fuses into the SwiGLU elementwise instead of a pass over the (N·K, D) output.
        h = F.silu(gate) * up * w_sorted.unsqueeze(-1).to(up.dtype)
        return grouped_mm(h, down_proj.transpose(1, 2), offs)  # (rows, D)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over experts in fp32 at least (bf16 inputs), in float64 for float64 (tests)."""
    return torch.promote_types(dtype, torch.float32)


def sequence_balance_loss(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i·P_i per sequence, averaged over the batch (SPEC §9.2, without α).

    f counts the experts actually selected (bias included): the paper writes Topk over s, implementations use
    the routing decision; we use the decision, which is what the bias steers.
    """
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    P_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    hits_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, idx_BTK.reshape(B, T * K), torch.ones(B, T * K, device=scores_BTE.device))
    f_BE = hits_BE * (E / (K * T))
    return (f_BE * P_BE).sum(-1).mean()


class _AttachLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends gradient 1 into `loss`: the loss joins the objective."""

    @staticmethod
    def forward(ctx, out, loss):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), device=grad.device, dtype=torch.float32)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts else None)
        # Coefficient of the sequence-wise balance loss; 0 disables it. Training sets α / grad-accumulation.
        self.balance_coef = 0.0

    def forward(self, x: torch.Tensor):
        """-> output, tokens per expert (E,), and the balance loss value (detached; None when not attached).

        Statistics are returned, not written into a shared object, so a torch.compile'd block sees no
        mutable state (a list passed in would guard and recompile per layer).
        """
        x_ND = x.reshape(-1, x.shape[-1])
        w_NK, idx_NK, scores_NE = self.gate(x_ND)
        y_ND, counts_E = self.experts(x_ND, w_NK, idx_NK)
        y = y_ND.view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        bal = None
        if self.balance_coef and x.dim() == 3 and torch.is_grad_enabled():
            bal = sequence_balance_loss(scores_NE.view(*x.shape[:2], -1), idx_NK.view(*x.shape[:2], -1))
            y = _AttachLoss.apply(y, bal * self.balance_coef)
            bal = bal.detach()
        return y, counts_E, bal
