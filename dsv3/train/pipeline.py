"""Pipeline parallelism through torch.distributed.pipelining: contiguous layer ranges as stages, 1F1B or
DualPipeV (DeepSeek-V3's bidirectional schedule; two stages per rank in a V: rank r holds stages r and
2·pp − 1 − r, so the first and the last stage both sit on rank 0).

A stage is a `StageModule` over the built model's own modules: the embedding on the first stage, layers
[lo, hi), the final norm and head on the last. It keeps the model's parameter names (`layers.{i}.…`), so a
stage's state dict is a slice of the model's. The sequence-wise balance loss reaches backward through each
layer's own autograd (MoE attaches it to the layer's output), not through the stage outputs, and each stage
records its layers' expert loads for the bias update. The trainer sends a step's whole batch through one
schedule step (accumulation as more chunks), validates with `forward_only`, and gathers the stages' weights on
rank 0 for the export. Not yet here: MTP (it needs the input ids and the embedding on the last stage),
packed-document masks across stages, pipeline combined with data or expert parallelism.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.model import rope
from dsv3.model.moe import MoE


def n_stages(pp: int, schedule: str) -> int:
    return pp * (2 if schedule == "dualpipev" else 1)


def pipeline_microbatches(cfg) -> int:
    """Pipeline micro-batches per training micro-batch: --pp-microbatches, by default one per stage."""
    return cfg.pp_microbatches or n_stages(cfg.pp, cfg.pp_schedule)


class StageModule(nn.Module):
    def __init__(self, model: nn.Module, lo: int, hi: int, index: int, n: int):
        super().__init__()
        first, last = index == 0, index == n - 1
        self.stage_index = index
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(lo, hi)})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_inv_freq", model.rope_inv_freq, persistent=False)
        self.rope_factor = model.rope_factor
        self.hidden = model.config.hidden_size
        self.counts: list[torch.Tensor] = []  # expert loads of this stage's MoE layers, per micro-batch
        self.bals: list[torch.Tensor] = []  # their sequence-wise balance losses (values, for the log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        B, T = h.shape[:2]
        positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = rope.cos_sin(positions, self.rope_inv_freq, self.rope_factor)
        for layer in self.layers.values():
            h, route = layer(h, cos, sin, None, None)
            if route is not None and torch.is_grad_enabled():
                self.counts.append(route[0])
                if route[1] is not None:
                    self.bals.append(route[1])
        return self.lm_head(self.norm(h)) if self.lm_head is not None else h

    @property
    def moe_ids(self) -> list[int]:
        """Indices (in the whole model) of this stage's MoE layers."""
        return [int(i) for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)]

    def moe_layers(self) -> list[nn.Module]:  # as Transformer.moe_layers: the balance helpers take a stage
        return [self.layers[str(i)].mlp for i in self.moe_ids]

    def take_loads(self, n_microbatches: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> ((MoE layers of this stage, E) loads summed over the last step's micro-batches, the sum of their
        balance losses averaged over the micro-batches); clears the record. The schedule's first step also runs a
        shape-inference forward, which the counts leave out."""
        per = len(self.moe_layers())
        if not per:
            return None, None
        loads = torch.stack(self.counts[-n_microbatches * per:]).view(n_microbatches, per, -1).sum(0)
        bal = torch.stack(self.bals[-n_microbatches * per:]).sum() / n_microbatches if self.bals else None
        self.counts.clear()
        self.bals.clear()
        return loads, bal


def stage_bounds(n_layers: int, n: int) -> list[tuple[int, int]]:
    """n contiguous ranges, as even as possible (earlier stages get the extra layer: the last carries the head)."""
    if n_layers < n:
        raise ValueError(f"{n_layers} layers cannot fill {n} pipeline stages")
    base, extra = divmod(n_layers, n)
    bounds, lo = [], 0
    for s in range(n):
        hi = lo + base + (s < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def build_schedule(model: nn.Module, pp_rank: int, pp: int, n_microbatches: int, loss_fn, schedule: str,
                   device: torch.device, group=None):
    """-> (schedule, this rank's StageModules). Inputs go in on the rank holding stage 0, targets on the rank
    holding the last stage (rank pp − 1 for 1F1B, rank 0 for DualPipeV)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
    if schedule not in ("1f1b", "dualpipev"):
        raise ValueError(f"--pp-schedule {schedule!r}: expected 1f1b or dualpipev")
    if model.config.num_nextn_predict_layers:
        raise ValueError("pipeline parallelism does not carry MTP yet: train with --no-mtp")
    n = n_stages(pp, schedule)
    if n_microbatches < n:
        raise ValueError(f"{n_microbatches} micro-batches for {n} stages: {schedule} needs at least as many")
    bounds = stage_bounds(len(model.layers), n)
    ids = [pp_rank] if schedule == "1f1b" else [pp_rank, n - 1 - pp_rank]
    modules = [StageModule(model, *bounds[s], s, n) for s in ids]
    stages = [PipelineStage(m, s, n, device, group=group) for m, s in zip(modules, ids)]
    if schedule == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn), modules
    return ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn), modules


@torch.no_grad()
def forward_only(modules: list[StageModule], input_ids: torch.Tensor, pp_rank: int, pp: int, schedule: str,
                 group=None) -> torch.Tensor | None:
    """The stages in order over one batch, activations passed rank to rank (fp32 on the wire) -> the logits on
    the rank holding the last stage, None elsewhere. For validation: the V schedules' eval() in torch 2.13 trips
    over their own backward actions."""
    import torch.distributed as dist
    n = n_stages(pp, schedule)
    owner = [s if s < pp else n - 1 - s for s in range(n)]  # the V of DualPipeV (1F1B: n == pp)
    mine = {m.stage_index: m for m in modules}
    B, T = input_ids.shape
    h = input_ids
    for s in range(n):
        if owner[s] != pp_rank:
            continue
        if s and owner[s - 1] != pp_rank:
            h = torch.empty(B, T, mine[s].hidden, device=input_ids.device)
            dist.recv(h, group_src=owner[s - 1], group=group)
        h = mine[s](h)
        if s + 1 < n and owner[s + 1] != pp_rank:
            dist.send(h.float().contiguous(), group_dst=owner[s + 1], group=group)
    return h if owner[-1] == pp_rank else None
