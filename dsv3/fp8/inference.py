"""FP8 weights at inference (docs/fp8.md#fp8-inference-weights): the decoder's linears held as DeepSeek's
checkpoints store them (docs/fp8.md#checkpoint-format: e4m3 with one fp32 scale per 128×128 block), half the memory
of bf16, and multiplied as they are (`fp8_weight_mm`: the activations stay bf16, fp32 accumulation; on a GPU a
Triton kernel widens each weight tile as it loads it).

The routed experts (the bulk of an MoE's weights) likewise: `Fp8WeightExperts` passes its block scales to
`routed_experts` (dsv3/kernels/moe.py), whose decode kernels scale each 128-wide slice of a reduction by its block's
scale, at any row count (a dequantized copy of a layer's experts would not fit for DeepSeek-V3); where those
kernels do not run (a CPU) it dequantizes per call.

`fp8_weights(model)` converts a loaded model in place; `load_model(path, fp8_weights=True)` builds the FP8 modules
first and fills them from the checkpoint, an FP8 one's values as stored. Which weights: those DeepSeek stores in
FP8 (attention projections, dense MLPs, shared and routed experts), except kv_b_proj, which absorbed attention
folds into the query and the output as dense matrices (docs/architecture.md#absorbed-attention).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.fp8.format import dequantize_blocks
from dsv3.fp8.gemm import fp8_weight_mm
from dsv3.fp8.quantize import quantize_blocks
from dsv3.kernels import moe_decode
from dsv3.kernels.moe import routed_experts
from dsv3.model.moe import Experts

KEEP = ("kv_b_proj", "eh_proj")  # kv_b_proj: see the docstring; eh_proj is bf16 in DeepSeek's checkpoints too


class Fp8WeightLinear(nn.Module):
    """A bias-free linear whose weight is e4m3 with 128×128 block scales (`weight`, `weight_scale_inv`: the
    checkpoint's names and layout). Inference only."""

    bias = None

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", weight_scale_inv)

    @classmethod
    def from_linear(cls, m: nn.Linear, ue8m0: bool = False) -> Fp8WeightLinear:
        if m.bias is not None:
            raise ValueError("FP8 weights: a linear with a bias is not one DeepSeek stores in FP8")
        return cls(*quantize_blocks(m.weight.detach(), ue8m0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_weight_mm(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks"


class Fp8WeightExperts(Experts):
    """Routed experts whose stacked weights are e4m3 with 128×128 block scales per expert. Inference only."""

    def __init__(self, m: Experts, ue8m0: bool = False):
        nn.Module.__init__(self)
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_blocks(getattr(m, name).detach(), ue8m0)
            self.register_buffer(name, q)
            self.register_buffer(name + "_scale_inv", s)

    def forward(self, x_ND, w_NK, idx_NK):
        w1, w2 = self.gate_up_proj, self.down_proj
        scales = (self.gate_up_proj_scale_inv, self.down_proj_scale_inv)
        if moe_decode.usable(x_ND, idx_NK.numel(), w1.shape[0], fp8=True):  # the kernels scale the e4m3 tiles
            return routed_experts(x_ND, w_NK, idx_NK, w1, w2, scales)
        # Without them (a CPU) the weights are dequantized per call.
        w1, w2 = (dequantize_blocks(w, s).to(x_ND.dtype) for w, s in zip((w1, w2), scales))
        return routed_experts(x_ND, w_NK, idx_NK, w1, w2)


def fp8_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what fp8_weights converts: the decoder layers' (and MTP blocks') linears but KEEP, and
    their routed experts."""
    return [(f"{root}.{name}", m) for root in ("layers", "mtp")
            for name, m in getattr(model, root, nn.Module()).named_modules()
            if (type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP) or type(m) is Experts]


def fp8_weights(model: nn.Module, ue8m0: bool = False) -> dict:
    """Replace the decoder layers' (and MTP blocks') linears and routed experts by their FP8 forms, in place ->
    how many of each. Call it before the engine is built (its fused projections join only plain linears)."""
    n = {"linears": 0, "experts": 0}
    for name, m in fp8_targets(model):
        linear = isinstance(m, nn.Linear)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                Fp8WeightLinear.from_linear(m, ue8m0) if linear else Fp8WeightExperts(m, ue8m0))
        n["linears" if linear else "experts"] += 1
    return n
