"""The forward and backward of one optimizer step, two ways; the Trainer picks one and never branches on the
layout again.

- PlainStep: the whole model on this rank (one process, data and expert parallelism). Each micro-batch of the
  step runs forward and backward on its own, its loss scaled by 1/accumulation, so the gradients add up to the
  mean over the global batch.
- PipelineStep: this rank's stages of a pipeline (dsv3/train/pipeline.py). The step's whole batch goes through
  one schedule step, as (micro-batches x pipeline micro-batches) chunks: the schedule scales the summed
  gradients once (a second step() would scale the first's again).

Both return the step's losses (averaged over the data-parallel ranks) and the expert loads of the global batch,
and move the aux-loss-free balance biases by those loads (docs/architecture.md#auxiliary-loss-free-balancing).
"""
from __future__ import annotations

from typing import Callable

import torch

from dsv3.data.loader import Batch
from dsv3.model import Transformer
from dsv3.train import parallel
from dsv3.train.config import ParallelConfig
from dsv3.train.objective import mtp_loss, next_token_loss, update_balance_bias
from dsv3.train.parallel import Layout
from dsv3.train.pipeline import build_schedule, forward_only, keep_own_stages, pipeline_microbatches


def rank_batch(batch: Batch, layout: Layout, device: torch.device) -> Batch:
    """This rank's slice of a global micro-batch, on its device."""
    if layout.distributed:
        part = layout.slice(len(batch.input_ids))
        batch = Batch(batch.input_ids[part], batch.labels[part], batch.doc_ids[part])
    return batch.to(device)


class PlainStep:
    def __init__(self, model: Transformer, layout: Layout, device: torch.device, autocast: bool, doc_mask: bool,
                 bias_rate: float | None):
        self.model, self.layout, self.device = model, layout, device
        self.autocast, self.doc_mask, self.bias_rate = autocast, doc_mask, bias_rate

    def balance_coef(self, alpha: float, accum: int) -> float:
        """The sequence-wise balance loss of each micro-batch's backward: α / accumulation, so it weighs the same
        as if the global batch were one forward."""
        return alpha / accum

    def _forward_loss(self, batch: Batch, lam: float):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.model(batch.input_ids, doc_ids=batch.doc_ids if self.doc_mask else None,
                             mtp=len(self.model.mtp) > 0)
        main = next_token_loss(out.logits, batch.labels)
        extra = mtp_loss(out.mtp_logits, batch.labels) if out.mtp_logits else None
        total = main + lam * extra if extra is not None else main
        return total, main, extra, out

    def accumulate(self, batches: list[Batch], lam: float) -> tuple[dict, torch.Tensor | None]:
        """Forward and backward over the step's global micro-batches (this rank's slices) -> (losses averaged
        over ranks, (MoE layers, E) expert loads of the global batch)."""
        accum, lay = len(batches), self.layout
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        counts = None
        for batch in batches:
            total, main, extra, out = self._forward_loss(rank_batch(batch, lay, self.device), lam)
            (total / accum).backward()
            sums["loss"] += main.detach() / accum
            if extra is not None:
                sums["mtp_loss"] += extra.detach() / accum
            if out.balance_loss is not None:
                sums["balance_loss"] += out.balance_loss / accum
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        if lay.distributed:
            counts = counts if counts is None else parallel.all_sum(counts, lay)
            sums = {k: parallel.all_sum(torch.as_tensor(v, device=self.device, dtype=torch.float32), lay) / lay.dp
                    for k, v in sums.items()}
        if counts is not None and self.bias_rate is not None:
            update_balance_bias(self.model, counts, self.bias_rate)
        return sums, counts

    def eval_logits(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.input_ids, doc_ids=batch.doc_ids if self.doc_mask else None).logits


class PipelineStep:
    """Cuts the model into this rank's stages (each prepared by `wrap`: expert parallelism, checkpointing,
    compile, FSDP over its data-parallel ranks) and drops the modules other ranks hold from `model`."""

    def __init__(self, model: Transformer, layout: Layout, device: torch.device, autocast: bool, doc_mask: bool,
                 bias_rate: float | None, par: ParallelConfig, grad_accum: int, pp_group,
                 wrap: Callable[[torch.nn.Module], None]):
        self.model, self.layout, self.device = model, layout, device
        self.autocast, self.doc_mask, self.bias_rate = autocast, doc_mask, bias_rate
        self.schedule_name, self.pp_group = par.pp_schedule, pp_group
        self.n_mb = pipeline_microbatches(par) * grad_accum
        self.losses = []  # (main, MTP) per pipeline micro-batch, for the log
        self.lam = 0.0  # the MTP weight of the current step (the schedule calls _loss)
        self.n_moe_rows, self.n_experts = len(model.moe_layers()), model.config.n_routed_experts
        self.schedule, self.stages = build_schedule(model, layout.pp_rank, layout.pp, self.n_mb, self._loss,
                                                    par.pp_schedule, device, pp_group, doc_mask, wrap=wrap)
        self.first, self.last = keep_own_stages(model, self.stages)

    def balance_coef(self, alpha: float, accum: int) -> float:
        """The schedule averages over all its chunks itself: the coefficient stays α."""
        return alpha

    def _loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn on the last stage: next-token loss, plus λ · MTP loss when the stage returns MTP
        logits too."""
        logits, mtp_logits = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        main = next_token_loss(logits, labels)
        extra = mtp_loss(mtp_logits, labels) if mtp_logits else None
        self.losses.append((main.detach(), extra.detach() if extra is not None else None))
        return main + self.lam * extra if extra is not None else main

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch.input_ids, batch.doc_ids) if self.doc_mask else (batch.input_ids,)

    def accumulate(self, batches: list[Batch], lam: float) -> tuple[dict, torch.Tensor | None]:
        """This rank's slice of the step's batch through its pipeline's schedule. The losses live on the last
        stage's ranks; each stage fills its rows of the model's load table, summed over all ranks (stages and
        data-parallel slices), and moves its layers' balance biases by the global loads."""
        lay = self.layout
        batch = rank_batch(Batch(*(torch.cat([getattr(b, f) for b in batches])
                                   for f in ("input_ids", "labels", "doc_ids"))), lay, self.device)
        self.losses.clear()
        self.lam = lam
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            self.schedule.step(*(self._inputs(batch) if self.first else ()),
                               **({"target": batch.labels} if self.last else {}))
        keys = ["loss", "balance_loss"] + (["mtp_loss"] if self.model.config.num_nextn_predict_layers else [])
        sums = {k: torch.zeros((), device=self.device) for k in keys}  # all_sum works in place: one tensor each
        mine = self.losses[-self.n_mb:]
        if mine:  # the last stage's ranks: the mean over the pipeline micro-batches
            sums["loss"] = torch.stack([m for m, _ in mine]).mean()
            if "mtp_loss" in sums:
                sums["mtp_loss"] = torch.stack([x for _, x in mine]).mean()
        table = torch.zeros(self.n_moe_rows, self.n_experts, device=self.device, dtype=torch.int64)
        for stage in self.stages:
            loads, bal = stage.take_loads(self.n_mb)
            if loads is not None:
                table[stage.moe_rows] = loads
                sums["balance_loss"] = sums["balance_loss"] + (bal if bal is not None else 0.0)
        sums = {k: parallel.all_sum(v.float(), lay) / lay.dp for k, v in sums.items()}
        if not self.n_moe_rows:
            return sums, None
        table = parallel.all_sum(table, lay)
        if self.bias_rate is not None:
            for stage in self.stages:
                if stage.moe_rows:
                    update_balance_bias(stage, table[stage.moe_rows], self.bias_rate)
        return sums, table

    def eval_logits(self, batch: Batch) -> torch.Tensor | None:
        """The logits on the last stage's ranks; None elsewhere."""
        out = forward_only(self.stages, self._inputs(batch), self.layout.pp_rank, self.layout.pp,
                           self.schedule_name, self.pp_group)
        return out[0] if isinstance(out, tuple) else out
