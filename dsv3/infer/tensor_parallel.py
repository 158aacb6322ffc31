"""Tensor parallelism at inference, DeepSeek's reference layout (docs/inference.md#tensor-parallel-layout): which
tensor each of N ranks holds whole and which it holds a 1/N slice of, and the checks that a model splits that way.

- MLA: heads split over the ranks. q_b_proj and kv_b_proj are column-parallel (their output rows, per head), o_proj
  row-parallel (its input columns, per head); q_a / kv_a projections and their norms are replicated, and so is
  the latent cache.
- Dense MLPs and shared experts: gate / up column-parallel, down row-parallel.
- Routed experts: partitioned, n_routed_experts / N whole experts per rank; the router is replicated.
- Embedding and output head: vocabulary-parallel (rows). MTP: its block like the others; eh_proj column-parallel.
- Everything else (norms, the routing bias) is replicated.

A split dimension of a weight held in FP8 must split on 128-block boundaries, so each rank's slice of the scale grid
is whole blocks; a ragged last block is allowed only in a dimension that is not split (kv_a_proj's 576 rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.fp8.format import BLOCK
from dsv3.fp8.inference import Fp8WeightLinear, fp8_targets
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, MoE

COLUMN = ("q_b_proj", "kv_b_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head", "eh_proj")  # split dim 0
ROW = ("o_proj", "down_proj")  # split dim 1 (the input features)


def split_dim(name: str) -> int | None:
    """The dimension of tensor `name` (a state-dict key) that is split over the ranks, or None: replicated. Routed
    experts (E, ...) split their first dimension: whole experts."""
    parts = name.split(".")
    if "experts" in parts:  # mlp.experts.gate_up_proj / down_proj (shared experts are "shared_experts")
        return 0
    module = parts[-2] if parts[-1] == "weight" else parts[-1]
    if module in COLUMN:
        return 0
    if module in ROW:
        return 1
    return None


def fp8_held(model: nn.Module) -> set[str]:
    """Names of the tensors `fp8_weights(model)` would hold in e4m3 (dsv3/fp8/inference.py)."""
    return {f"{name}.{p}" for name, m in fp8_targets(model) for p, _ in m.named_parameters()}


def check_divisible(cfg: ModelConfig, tp: int, named_shapes, fp8: set[str]) -> None:
    """One ValueError naming everything that does not split over `tp` ranks: heads and routed experts, and every
    split dimension (in whole 128-blocks for a tensor held in FP8)."""
    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(f"num_attention_heads={cfg.num_attention_heads}")
    if cfg.n_routed_experts % tp:
        problems.append(f"n_routed_experts={cfg.n_routed_experts}")
    seen = set()
    for name, shape in named_shapes:
        d = split_dim(name)
        if d is None or (len(shape) == 3 and d == 0):
            continue  # experts: counted above
        size, blocks = shape[d], name in fp8
        key = (_generic(name), size, blocks)
        if key in seen:
            continue
        seen.add(key)
        unit = tp * BLOCK if blocks else tp
        if size % unit:
            problems.append(f"{_generic(name)} dimension {d} of {size}" + (" (FP8: whole 128-blocks per rank)"
                                                                            if blocks else ""))
    if problems:
        raise ValueError(f"tensor parallelism over {tp} ranks: these do not split evenly: {'; '.join(problems)}")


def _generic(name: str) -> str:
    """`layers.3.self_attn.o_proj.weight` and `mtp.self_attn.o_proj.weight` -> `self_attn.o_proj.weight`."""
    return ".".join(p for p in name.split(".")[1:] if not p.isdigit()) if "." in name else name


# ---- the transform: a built model becomes one rank's shard ------------------------------------------------------
def apply_tp(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """In place: every module keeps its rank's slice of the layout above and does its own collectives (one
    all-reduce after attention, one per MLP or MoE layer: the shared and routed partial sums together; the head's
    logits all-gathered). Before or after fp8_weights (an FP8 weight's scale grid is cut with it, in whole blocks).
    Inference only (no gradients through the collectives). Every rank must hold the same model before (the same
    seed or checkpoint): the replicated parts stay as they are."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return model
    named = [(name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    fp8 = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Fp8WeightLinear)}
    check_divisible(model.config, n, named, fp8)
    for name, m in list(model.named_modules()):
        if isinstance(m, MLA):
            _take(m, "q_b_proj" if hasattr(m, "q_b_proj") else "q_proj", 0, n, rank)
            _take(m, "kv_b_proj", 0, n, rank)
            _take(m, "o_proj", 1, n, rank)
            _extend(m.o_proj, _AllReduced, group)
            m.n_heads //= n
        elif isinstance(m, MoE):
            per = m.experts.gate_up_proj.shape[0] // n
            for attr, t in [*m.experts.named_parameters(recurse=False), *m.experts.named_buffers(recurse=False)]:
                _replace(m.experts, attr, t.narrow(0, rank * per, per))  # whole experts, with their scales
            if m.shared_experts is not None:
                _split_mlp(m.shared_experts, n, rank)
            m.__class__, m.group, m.first_expert = _ParallelMoE, group, rank * per
        elif type(m) is MLP and not name.endswith("shared_experts"):
            _split_mlp(m, n, rank)
            _extend(m.down_proj, _AllReduced, group)
    tied = model.lm_head.weight is model.embed_tokens.weight
    _take(model, "embed_tokens", 0, n, rank)
    model.embed_tokens.__class__, model.embed_tokens.group = _VocabParallelEmbedding, group
    model.embed_tokens.first_row = rank * model.embed_tokens.weight.shape[0]
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        _take(model, "lm_head", 0, n, rank)
    _extend(model.lm_head, _Gathered, group)
    for m in getattr(model, "mtp", []):
        _take(m, "eh_proj", 0, n, rank)
        _extend(m.eh_proj, _Gathered, group)
    return model


def _replace(m: nn.Module, attr: str, t: torch.Tensor) -> None:
    """m.attr becomes a copy of `t` (the full tensor can then be freed), a parameter or a buffer as before."""
    if attr in m._parameters:
        setattr(m, attr, nn.Parameter(t.clone(), requires_grad=False))
    else:
        setattr(m, attr, t.clone())


def _take(parent: nn.Module, attr: str, dim: int, n: int, rank: int) -> None:
    """parent.attr (a linear, bf16 or FP8, or the embedding) cut to this rank's 1/n along `dim`; an FP8 weight's
    scale grid along the same dimension (the split is in whole 128-blocks: check_divisible)."""
    m = getattr(parent, attr)
    names = ("weight", "weight_scale_inv") if isinstance(m, Fp8WeightLinear) else ("weight",)
    for name in names:
        t = getattr(m, name)
        size = t.shape[dim] // n
        _replace(m, name, t.narrow(dim, rank * size, size))
    if isinstance(m, (nn.Linear, Fp8WeightLinear)):
        m.out_features, m.in_features = m.weight.shape


def _split_mlp(m: MLP, n: int, rank: int) -> None:
    _take(m, "gate_proj", 0, n, rank)
    _take(m, "up_proj", 0, n, rank)
    _take(m, "down_proj", 1, n, rank)


_extended: dict[tuple[type, type], type] = {}


def _extend(m: nn.Module, mixin: type, group) -> None:
    """m's class becomes mixin + its class (a plain or an FP8 linear alike), with the process group to use."""
    key = (mixin, type(m))
    if key not in _extended:
        _extended[key] = type(f"{mixin.__name__.strip('_')}{type(m).__name__}", key, {})
    m.__class__, m.group = _extended[key], group


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


class _AllReduced:
    """A row-parallel linear: its rank's input columns give a partial sum, all-reduced."""

    def forward(self, x):
        return _all_reduce(super().forward(x), self.group)


class _Gathered:
    """A column-parallel linear whose whole output is needed: its rank's rows, all-gathered (the vocabulary's
    logits; MTP's eh_proj)."""

    def forward(self, x):
        part = super().forward(x).contiguous()
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, dim=-1)


class _VocabParallelEmbedding(nn.Embedding):
    """Rows of its rank's slice of the vocabulary; ids outside it give zeros; the sum over ranks is the lookup."""

    def forward(self, ids):
        local = ids - self.first_row
        inside = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        return _all_reduce(h, self.group)


class _ParallelMoE(MoE):
    """Its rank's n_routed/N experts run on the (token, expert) pairs routed to them; their partial sum and the
    shared expert's (column / row split) are added, then all-reduced once. The router is replicated, so every
    rank routes alike."""

    def forward(self, x):
        x_ND = x.reshape(-1, x.shape[-1])
        w_NK, idx_NK, _ = self.gate(x_ND)
        E_local = self.experts.gate_up_proj.shape[0]
        local = (idx_NK >= self.first_expert) & (idx_NK < self.first_expert + E_local)
        token_P, k_P = local.nonzero(as_tuple=True)  # the pairs this rank computes
        y_ND = torch.zeros_like(x_ND)
        if token_P.numel():
            y_PD, _ = self.experts(x_ND[token_P], w_NK[token_P, k_P, None],
                                   (idx_NK[token_P, k_P] - self.first_expert)[:, None])
            y_ND.index_add_(0, token_P, y_PD.to(y_ND.dtype))
        y = y_ND.view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        counts_E = torch.bincount(idx_NK.flatten(), minlength=self.gate.weight.shape[0])
        return _all_reduce(y, self.group), counts_E, None


# ---- N engines in lockstep ------------------------------------------------------------------------------------
class TPEngine:
    """Rank 0's face of the N ranks' engines. Rank 0 takes the requests; before each step it broadcasts what
    changed since the last (requests added, aborted) with the order to step, and every rank steps its own engine:
    the schedulers decide alike (the same requests in the same order), the forwards meet in their collectives,
    and every rank samples the same tokens from the same all-reduced logits with the same generators. Anything
    else reads rank 0's engine."""

    def __init__(self, engine, group: dist.ProcessGroup | None = None):
        self.engine, self.group, self.pending = engine, group, []

    def add_request(self, prompt, params=None, request_id: str | None = None) -> str:
        rid = self.engine.add_request(prompt, params, request_id)  # checked here: a bad request never leaves rank 0
        self.pending.append(("add", (prompt, params, rid)))
        return rid

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.pending.append(("abort", (request_id,)))

    def step(self):
        ops, self.pending = self.pending, []
        dist.broadcast_object_list([("step", ops)], src=0, group=self.group)
        return self.engine.step()

    def close(self) -> None:
        """The other ranks leave `follow`."""
        dist.broadcast_object_list([("stop", [])], src=0, group=self.group)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def follow(engine, group: dist.ProcessGroup | None = None) -> None:
    """Ranks 1..N-1: apply what rank 0's TPEngine broadcasts to this rank's engine, step by step, until it stops."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        order, ops = box[0]
        if order == "stop":
            return
        for op, args in ops:
            engine.add_request(*args) if op == "add" else engine.abort(*args)
        engine.step()
