"""Pipeline parallelism through torch.distributed.pipelining: contiguous layer ranges as stages, 1F1B or
DualPipeV (DeepSeek-V3's bidirectional schedule; two stages per rank in a V: rank r holds stages r and
2·pp − 1 − r, so the first and the last stage both sit on rank 0).

A stage is a `StageModule` over the built model's own modules: the embedding on the first stage, layers
[lo, hi), the final norm, head and MTP modules on the last. It keeps the model's parameter names
(`layers.{i}.…`), so a stage's state dict is a slice of the model's. MTP needs the embeddings of the next tokens
on the last stage: the first stage's embedding output travels with the hidden state (StageModule), so the
embedding exists once and its two gradients meet in autograd. The sequence-wise balance loss reaches backward
through each layer's own autograd (MoE attaches it to the layer's output), not through the stage outputs, and
each stage records its layers' expert loads for the bias update. The trainer sends a step's whole batch through
one schedule step (accumulation as more chunks), validates with `forward_only`, and gathers the stages' weights
on rank 0 for the export. Each stage can be sharded over data-parallel ranks (FSDP2, expert parallelism: a
(pp, dp) device mesh, dsv3/train/parallel.py).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.model import rope
from dsv3.model.moe import MoE
from dsv3.model.transformer import document_positions_and_mask
from dsv3.train.config import ParallelConfig


def n_stages(pp: int, schedule: str) -> int:
    return pp * (2 if schedule == "dualpipev" else 1)


def pipeline_microbatches(par: ParallelConfig) -> int:
    """Pipeline micro-batches per training micro-batch: --pp-microbatches, by default one per stage."""
    return par.pp_microbatches or n_stages(par.pp, par.pp_schedule)


class StageModule(nn.Module):
    """Stage `index` of n: the embedding on the first, layers [lo, hi), the final norm, head and MTP modules on the
    last. What flows between stages is a tuple: the hidden state; with MTP the embedding output of the input ids
    (MTP depth k reads e[:, k:], the embeddings of the next tokens), so the last stage needs neither the ids nor a
    copy of the embedding, and the embedding, which lives on the first stage only, gets both its gradients (the
    main path's and MTP's, sent back along the pipeline) summed by autograd; with document masks the doc ids
    (integers, no gradient), from which each stage rebuilds positions and mask."""

    def __init__(self, model: nn.Module, lo: int, hi: int, index: int, n: int, doc_mask: bool = False):
        super().__init__()
        first, last = index == 0, index == n - 1
        self.stage_index = index
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(lo, hi)})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last else nn.ModuleList()
        self.carry_embeddings = len(model.mtp) > 0
        self.doc_mask = doc_mask
        self.register_buffer("rope_inv_freq", model.rope_inv_freq, persistent=False)
        self.rope_factor = model.rope_factor
        self.hidden = model.config.hidden_size
        every = model.moe_layers()  # rows of the model's expert-load table held here (MTP's after the layers')
        self.moe_rows = [next(r for r, m in enumerate(every) if m is mine) for mine in self.moe_layers()]
        self.counts: list[torch.Tensor] = []  # expert loads of this stage's MoE layers, per micro-batch
        self.bals: list[torch.Tensor] = []  # their sequence-wise balance losses (values, for the log)

    def forward(self, *inputs: torch.Tensor):
        """First stage: (input ids[, doc ids]); others: what the previous stage returned. -> the next stage's
        inputs, or on the last stage the logits (with MTP: (logits, MTP depth-1 logits, ...))."""
        if self.embed_tokens is not None:
            h = e = self.embed_tokens(inputs[0])
            rest = inputs[1:]
        else:
            h, rest = inputs[0], inputs[1:]
            e, rest = (rest[0], rest[1:]) if self.carry_embeddings else (None, rest)
        doc_ids = rest[0] if self.doc_mask else None
        B, T = h.shape[:2]
        if doc_ids is not None:
            positions, mask = document_positions_and_mask(doc_ids)
        else:
            positions, mask = torch.arange(T, device=h.device).expand(B, T), None
        cos, sin = rope.cos_sin(positions, self.rope_inv_freq, self.rope_factor)
        for layer in self.layers.values():
            h = self._record(layer(h, cos, sin, mask, None))
        if self.lm_head is None:
            out = (h, *((e,) if self.carry_embeddings else ()), *((doc_ids,) if self.doc_mask else ()))
            return out if len(out) > 1 else h
        h = self.norm(h)
        logits = [self.lm_head(h)]
        for k, layer in enumerate(self.mtp, start=1):  # as Transformer._mtp, with e[:, k:] for embed(ids[:, k:])
            n = T - k
            h = self._record(layer(h[:, :n], e[:, k:], cos[:, :n], sin[:, :n],
                                   None if mask is None else mask[:, :, :n, :n]))
            logits.append(self.lm_head(layer.shared_head.norm(h)))
        return tuple(logits) if len(logits) > 1 else logits[0]

    def _record(self, out):
        h, route = out
        if route is not None and torch.is_grad_enabled():
            self.counts.append(route[0])
            if route[1] is not None:
                self.bals.append(route[1])
        return h

    def moe_layers(self) -> list[nn.Module]:  # as Transformer.moe_layers: the balance helpers take a stage
        return [b.mlp for b in (*self.layers.values(), *self.mtp) if isinstance(b.mlp, MoE)]

    def take_loads(self, n_microbatches: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> ((MoE layers of this stage, E) loads summed over the last step's micro-batches, the sum of their
        balance losses averaged over the micro-batches); clears the record. The schedule's first step also runs a
        shape-inference forward, which the counts leave out."""
        per = len(self.moe_rows)
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
                   device: torch.device, group=None, doc_mask: bool = False, wrap=None):
    """-> (schedule, this rank's StageModules). Inputs go in on the rank holding stage 0, targets on the rank
    holding the last stage (rank pp − 1 for 1F1B, rank 0 for DualPipeV). `wrap(module)` (the trainer's expert
    parallelism, checkpointing, compile, FSDP) is applied to each StageModule before the schedule takes it."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
    if schedule not in ("1f1b", "dualpipev"):
        raise ValueError(f"--pp-schedule {schedule!r}: expected 1f1b or dualpipev")
    n = n_stages(pp, schedule)
    if n_microbatches < n:
        raise ValueError(f"{n_microbatches} micro-batches for {n} stages: {schedule} needs at least as many")
    bounds = stage_bounds(len(model.layers), n)
    ids = [pp_rank] if schedule == "1f1b" else [pp_rank, n - 1 - pp_rank]
    modules = [StageModule(model, *bounds[s], s, n, doc_mask) for s in ids]
    for m in modules if wrap else ():
        wrap(m)
    stages = [PipelineStage(m, s, n, device, group=group) for m, s in zip(modules, ids)]
    if schedule == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn), modules
    return ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn), modules


def keep_own_stages(model: nn.Module, stages: list[StageModule]) -> tuple[bool, bool]:
    """Drop from `model` every module that no stage of this rank holds, so that its parameters, optimizer state and
    checkpoint shards are this rank's alone: a layer held elsewhere becomes an Identity (the indices, hence the
    parameter names `layers.{i}.…` of the layers kept, stay), the embedding goes unless this rank holds the first
    stage, the final norm, head and MTP modules unless it holds the last. -> (holds the first stage, the last)."""
    owned = {int(i) for m in stages for i in m.layers}
    for i in range(len(model.layers)):
        if i not in owned:
            model.layers[i] = nn.Identity()
    first = any(m.embed_tokens is not None for m in stages)
    last = any(m.lm_head is not None for m in stages)
    if not first:
        model.embed_tokens = None
    if not last:
        model.norm = model.lm_head = None
        model.mtp = nn.ModuleList()
    return first, last


@torch.no_grad()
def forward_only(modules: list[StageModule], inputs: tuple[torch.Tensor, ...], pp_rank: int, pp: int,
                 schedule: str, group=None):
    """The stages in order over one batch (inputs as for the first stage), what flows between stages passed rank
    to rank (floats as fp32 on the wire) -> the last stage's output on the rank holding it, None elsewhere. For
    validation: the V schedules' eval() in torch 2.13 trips over their own backward actions."""
    import torch.distributed as dist
    n = n_stages(pp, schedule)
    owner = [s if s < pp else n - 1 - s for s in range(n)]  # the V of DualPipeV (1F1B: n == pp)
    mine = {m.stage_index: m for m in modules}
    B, T = inputs[0].shape
    x = inputs
    for s in range(n):
        if owner[s] != pp_rank:
            continue
        if s and owner[s - 1] != pp_rank:
            m = mine[s]
            x = [torch.empty(B, T, m.hidden, device=inputs[0].device) for _ in range(1 + m.carry_embeddings)]
            x += [torch.empty_like(inputs[0])] if m.doc_mask else []
            for t in x:
                dist.recv(t, group_src=owner[s - 1], group=group)
        x = mine[s](*x)
        x = x if isinstance(x, tuple) else (x,)
        if s + 1 < n and owner[s + 1] != pp_rank:
            for t in x:
                dist.send((t.float() if t.is_floating_point() else t).contiguous(), group_dst=owner[s + 1],
                          group=group)
    if owner[-1] != pp_rank:
        return None
    return x if len(x) > 1 else x[0]
