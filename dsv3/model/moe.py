"""DeepSeekMoE (DeepSeek-V3 report §2.1.2): fine-grained routed experts + shared experts, every gate variant
(docs/architecture.md#routing, docs/architecture.md#experts).

How the (token, expert) rows reach their experts is kernels/moe.py's (`routed_experts`: grouped GEMM over rows
sorted by expert, no capacity factor, no token dropping). The sequence-wise balance loss
(docs/architecture.md#sequence-wise-balance-loss) enters through autograd right here (`_AttachLoss`), so it
reaches the router even when layers run in pipeline stages that pass only hidden states between them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels.moe import grouped_swiglu, routed_experts


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def _gate_up(self, x):
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self._gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: affinities in fp32, group-limited top-k selection, weights from the unbiased scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.scoring, self.norm = cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            # Aux-loss-free balancing bias (docs/architecture.md#auxiliary-loss-free-balancing): selection only,
            # never trained by gradients, kept in fp32.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Token-to-expert affinity logits u_t · e_i in fp32: (N, E)."""
        return F.linear(x_ND.float(), self.weight.float())

    def forward(self, x_ND: torch.Tensor):
        N, E = x_ND.shape[0], self.weight.shape[0]
        with torch.autocast(x_ND.device.type, enabled=False):  # routing decisions in fp32, also under autocast
            logits_NE = self._logits(x_ND)
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
    comparison beats a topk call (its sort kernels: measured in docs/inference.md#decode-speed) and fuses with
    the routing around it."""
    i = torch.arange(x_NG.shape[-1], device=x_NG.device)
    a, b = x_NG.unsqueeze(-1), x_NG.unsqueeze(-2)  # entry g against every entry h
    return ((b > a) | ((b == a) & (i < i[:, None]))).sum(-1)


def _top2_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values along the last dim (ties count twice, as topk(2) would).

    Two max reductions instead of a topk: they fuse with the routing, topk's sort kernels do not (measured:
    docs/training.md).
    """
    first = x.amax(-1, keepdim=True)
    second = x.scatter(-1, x.argmax(-1, keepdim=True), float("-inf")).amax(-1, keepdim=True)
    return (first + second).squeeze(-1)


class Experts(nn.Module):
    """All routed experts of a layer as stacked weights (transformers 5 in-memory layout): expert e's FFN is
    down_e(silu(gate_e(u)) ⊙ up_e(u)), and a token's output is Σ_k w_k · FFN_{e_k}(u) over its K experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))  # rows [0, F) gate, [F, 2F) up
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_ND, w_NK, idx_NK):
        """-> y_ND, tokens per expert counts_E; how the rows reach their experts: dsv3/kernels/moe.py."""
        return routed_experts(x_ND, w_NK, idx_NK, self.gate_up_proj, self.down_proj, ffn=self.ffn)

    def ffn(self, x_sorted, w_sorted, offs, gate_up_proj=None, down_proj=None):
        """SwiGLU of each expert over its rows (sorted by expert, group ends `offs`), scaled by routing weights;
        of these experts' weights unless others are given (an expert-parallel rank's share)."""
        gate_up_proj = self.gate_up_proj if gate_up_proj is None else gate_up_proj
        down_proj = self.down_proj if down_proj is None else down_proj
        return grouped_swiglu(x_sorted, w_sorted, offs, gate_up_proj, down_proj)


def sequence_balance_loss(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i·P_i per sequence, averaged over the batch, without α
    (docs/architecture.md#sequence-wise-balance-loss).

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
