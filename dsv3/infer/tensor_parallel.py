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

from torch import nn

from dsv3.config import ModelConfig
from dsv3.fp8.format import BLOCK
from dsv3.fp8.inference import KEEP
from dsv3.model.moe import Experts

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
    """Names of the tensors `fp8_weights(model)` would hold in e4m3 (dsv3/fp8/inference.py): the decoder's linears
    but kv_b_proj and eh_proj, and the routed experts."""
    names = set()
    for root in ("layers", "mtp"):
        for name, m in getattr(model, root, nn.Module()).named_modules():
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP:
                names.add(f"{root}.{name}.weight")
            elif isinstance(m, Experts):
                names |= {f"{root}.{name}.{p}" for p, _ in m.named_parameters()}
    return names


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
