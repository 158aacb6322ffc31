"""The engine's changes to a built model, applied as a transform (as apply_fp8 and fp8_weights are):
`prepare_for_engine(model)` swaps module classes in place for inference subclasses that keep every parameter,
its name and the training path (GRPO trains the very module the engine samples from):

    MLA  -> PagedMLA    attention over the paged latent cache, x's two projections as one GEMM    (attention.py)
    MLP  -> FusedMLP    gate and up as one GEMM
    Gate -> DecodeGate  the router's GEMV as a reduction that torch.compile fuses with the scoring

A decode step is bound by its kernel count, not its bytes: fused projections and the compiled router save
kernels. Fused matrices are used only without autograd; training goes through the separate layers as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.infer.attention import PagedMLA
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, Gate


@torch.no_grad()
def fuse_rows(fused: torch.Tensor | None, *linears: nn.Linear) -> torch.Tensor | None:
    """One (Σ out, in) matrix holding these bias-free layers' weights as consecutive row blocks; each layer's weight
    (the same Parameter object) comes to share its block's memory, so nothing is stored twice and in-place updates
    (an optimizer step, a load_state_dict) reach both; checkpoints write them as before. Call it once the model
    sits on its device and dtype: moving the model afterwards would part the two. Returns `fused` itself when the
    layers still share it, and None when a layer is not a plain nn.Linear (FP8 weights: dsv3/fp8/inference.py)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    first = linears[0].weight
    if fused is not None and first.data_ptr() == fused.data_ptr() and first.device == fused.device:
        return fused
    fused = torch.cat([m.weight for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[row:row + n]  # the same Parameter object: an optimizer built before still holds it
        row += n
    return fused


class FusedMLP(MLP):
    gate_up: torch.Tensor | None = None  # [gate ; up] rows, sharing their weights' memory

    def _gate_up(self, x):
        if self.gate_up is not None and not torch.is_grad_enabled():
            return F.linear(x, self.gate_up).chunk(2, dim=-1)
        return super()._gate_up(x)


# Tokens up to which a compiled router takes its logits as a reduction (decode steps, CUDA graphs' buckets).
DECODE_ROUTER_MAX_TOKENS = 256


class DecodeGate(Gate):
    def _logits(self, x_ND):
        if torch.compiler.is_compiling() and x_ND.shape[0] <= DECODE_ROUTER_MAX_TOKENS:
            # A reduction that Inductor fuses with the weight's cast and the scoring after it (cuBLAS runs this
            # GEMV as two kernels, after a third that casts the weight).
            return (x_ND.float().unsqueeze(1) * self.weight.float()).sum(-1)
        return super()._logits(x_ND)


ENGINE_CLASSES = {MLA: PagedMLA, MLP: FusedMLP, Gate: DecodeGate}


def prepare_for_engine(model: nn.Module) -> nn.Module:
    """Swap the model's MLA / MLP / Gate modules for the engine's subclasses and fuse their projections, in place
    -> the model. Idempotent. State-dict keys and parameter objects do not change (an optimizer built before
    still steps them). Call it once the model sits on its device and dtype, after fp8_weights if any (fused
    projections join only plain linears)."""
    for m in model.modules():
        if type(m) in ENGINE_CLASSES:
            m.__class__ = ENGINE_CLASSES[type(m)]
        if isinstance(m, PagedMLA) and m._q_first.bias is None and m.kv_a_proj_with_mqa.bias is None:
            m.fused_a = fuse_rows(m.fused_a, m._q_first, m.kv_a_proj_with_mqa)
        elif isinstance(m, FusedMLP):
            m.gate_up = fuse_rows(m.gate_up, m.gate_proj, m.up_proj)
    return model
