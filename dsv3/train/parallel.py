"""Training on several processes with torch.distributed: `torchrun --nproc-per-node N -m dsv3 train ...`.

Data parallelism with FSDP2 (`fully_shard` per block, then the root) and expert parallelism (`--ep`: routed
experts split over groups of consecutive ranks, all-to-all dispatch and combine; `EPExperts`), NCCL on GPUs and
gloo on CPUs. Pipeline parallelism (`--pp`) lives in dsv3/train/pipeline.py; for now it runs alone.
`--batch-size` is the global batch: every rank reads the same global micro-batch from the loader (the order a
single process would see) and trains on its 1/dp slice, so one command trains on the same data whatever the
layout, and the run equals the single-process one up to float rounding (tests/test_parallel.py). The model code
stays single-device: sharding is applied to the built model. Gradient clipping sees the global norm (DTensor
gradients); the aux-loss-free balance bias is updated from expert loads summed over all ranks, so every rank
keeps the same (replicated) bias. Checkpoints: the state is saved sharded with torch.distributed.checkpoint and
resumes at any rank count; rank 0 gathers the full weights for the Hugging Face export.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn

from dsv3.model.moe import Experts
from dsv3.train.pipeline import pipeline_microbatches


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    pp: int = 1
    distributed: bool = False  # launched by torchrun: the parallel code path, even with one process

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's part of n sequences of a global micro-batch."""
        per = n // self.dp
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)


def layout_errors(cfg, world: int, n_experts: int, mtp: bool = False) -> list[str]:
    if cfg.pp > 1:
        errors = []
        if world != cfg.pp or cfg.ep > 1 or cfg.dp_shard not in (-1, 1):
            errors.append(f"--pp {cfg.pp} needs exactly {cfg.pp} processes and no --ep / --dp-shard for now "
                          f"(world size {world}): pipeline with data or expert parallelism comes later")
        if mtp:
            errors.append("--pp does not carry MTP yet: add --no-mtp")
        if cfg.doc_mask:
            errors.append("--pp does not pass document masks between stages yet: drop --doc-mask")
        n_mb = pipeline_microbatches(cfg)
        if (cfg.micro_batch_size or cfg.batch_size) % n_mb:
            errors.append(f"the micro-batch ({cfg.micro_batch_size or cfg.batch_size} sequences) must split into "
                          f"{n_mb} pipeline micro-batches")
        return errors
    dp = world if cfg.dp_shard == -1 else cfg.dp_shard
    errors = []
    if dp < 1 or world % dp or dp != world:
        errors.append(f"--dp-shard {cfg.dp_shard} does not fit the world size {world} (every process is a data-"
                      "parallel rank: dp-shard must be -1 or the number of processes)")
    elif cfg.batch_size % dp or (cfg.micro_batch_size or cfg.batch_size) % dp:
        errors.append(f"--batch-size {cfg.batch_size} and --micro-batch-size {cfg.micro_batch_size} (global) must "
                      f"be multiples of dp-shard={dp}")
    if cfg.ep < 1 or world % cfg.ep:
        errors.append(f"--ep {cfg.ep} does not divide the world size {world}")
    elif n_experts % cfg.ep:
        errors.append(f"--ep {cfg.ep} does not divide the model's n_routed_experts={n_experts}")
    if cfg.ep > 1 and cfg.precision == "fp8" and cfg.fp8_experts:
        errors.append("--fp8-experts does not combine with --ep yet (FP8 linears do)")
    return errors


def init(cfg, n_experts: int, mtp: bool = False) -> Layout:
    """Read torchrun's environment, check the layout (one clear error on rank 0 before any work), join the
    process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    errors = layout_errors(cfg, world, n_experts, mtp)
    if errors:
        if rank:
            sys.exit(1)
        raise ValueError("; ".join(errors))
    if "RANK" not in os.environ:  # a plain `dsv3 train`
        return Layout()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg.pp > 1:
        return Layout(rank=rank, world=world, local_rank=local, pp=cfg.pp, distributed=True)
    return Layout(rank=rank, world=world, local_rank=local, dp=world, dp_rank=rank, ep=cfg.ep, distributed=True)


def shard(model: torch.nn.Module, layout: Layout, device: torch.device) -> torch.nn.Module:
    """Expert parallelism first (routed experts split over groups of `ep` consecutive ranks), then FSDP2: the
    experts over the ranks that hold the same experts, each decoder block (and MTP module) over all ranks, then
    the root (embedding, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh(device.type, (layout.dp,), mesh_dim_names=("dp_shard",))
    if layout.ep > 1:
        mesh2 = init_device_mesh(device.type, (layout.world // layout.ep, layout.ep),
                                 mesh_dim_names=("dp_replicate", "ep"))
        for m in model.modules():
            if type(m) is Experts:
                for name in ("gate_up_proj", "down_proj"):  # DTensors over the EP ranks: checkpoints see all E
                    full = getattr(m, name).detach()
                    setattr(m, name, torch.nn.Parameter(distribute_tensor(full, mesh2["ep"], [Shard(0)])))
                m.__class__, m.ep, m.group = EPExperts, layout.ep, mesh2["ep"].get_group()
                fully_shard(m, mesh=mesh2["dp_replicate"])
                # Each rank's loss is the mean over its own tokens, and an expert's gradient sums the rows of
                # every rank of its EP group: divide by the world size, as one process over the whole batch.
                m.set_gradient_divide_factor(float(layout.world))
    if layout.dp > 1:  # one data-parallel rank has nothing to shard or overlap: the root alone, one unit (each
        # unit costs ~1 ms of CPU per all-gather and per reduce-scatter: 0.78x of the plain loop with per-block units)
        for layer in model.mtp:  # the root calls an MTP module's final norm outside the module's forward
            fully_shard(layer.shared_head.norm, mesh=mesh)
        blocks = [*model.layers, *model.mtp]
        for i, block in enumerate(blocks):  # the last block's weights are needed again at once by backward
            fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, reshard_after_forward=layout.dp > 1)
    return model


def clip_grad_norm(params, max_norm: float, layout: Layout = Layout()) -> torch.Tensor:
    """The global gradient norm, clipped to max_norm. Every gradient element lives on exactly one rank (FSDP and
    expert shards, pipeline stages), so the squares of the local shards summed over all ranks are the square of
    the global norm: one all-reduce on plain local tensors (DTensor ops cost ~1 ms of CPU each)."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    squares = torch.nn.utils.get_total_norm(grads).float().pow(2)
    if layout.distributed:
        dist.all_reduce(squares)
    total = squares.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._foreach_mul_(group, coef.to(group[0].dtype))
    return total


def all_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.distributed:
        dist.all_reduce(t)
    return t


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


class EPExperts(Experts):
    """Routed experts sharded over an expert-parallel group of `ep` ranks: this rank holds experts
    [r·E/ep, (r+1)·E/ep). Dispatch: each rank sorts its (token, expert) rows by expert, exchanges the per-expert
    counts (all_to_all), then the rows with their routing weight as one extra column (all_to_all_single, split by
    destination rank); the receiver regroups them by local expert and runs the same SwiGLU as one process would.
    Combine: the results go back the same way and are summed per token in a fixed order. Both exchanges are
    differentiable, so backward sends the gradients back along the same routes."""

    group = None
    ep = 1

    def forward(self, x_ND, w_NK, idx_NK):
        N, K = idx_NK.shape
        E_local = self._local(self.gate_up_proj).shape[0]
        E = E_local * self.ep
        flat = idx_NK.flatten()
        counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        rows = torch.cat([x_ND[order // K], w_NK.flatten()[order].unsqueeze(-1).to(x_ND.dtype)], dim=-1)
        recv_SE = torch.empty_like(counts_E)  # [s·E_local + j]: rows source rank s has for my local expert j
        dist.all_to_all_single(recv_SE, counts_E, group=self.group)
        recv_SE = recv_SE.view(self.ep, E_local)
        send, recv = counts_E.view(self.ep, E_local).sum(1).tolist(), recv_SE.sum(1).tolist()  # host sync
        got = dnn.all_to_all_single(rows.new_empty(sum(recv), rows.shape[-1]), rows, recv, send, group=self.group)
        local = torch.arange(E_local, device=flat.device).repeat(self.ep).repeat_interleave(recv_SE.flatten())
        perm = local.argsort(stable=True)  # received rows come grouped by source: regroup them by expert
        y = self.ffn(got[perm, :-1], got[perm, -1], recv_SE.sum(0).cumsum(0).to(torch.int32),
                     self._local(self.gate_up_proj), self._local(self.down_proj))
        y_got = y.new_empty(y.shape).index_copy(0, perm, y)
        back = dnn.all_to_all_single(y.new_empty(len(order), y.shape[-1]), y_got, send, recv, group=self.group)
        y_NKD = back.new_empty(back.shape).index_copy(0, order, back).view(N, K, -1)
        return y_NKD.sum(1, dtype=torch.float32).to(x_ND.dtype), counts_E

    @staticmethod
    def _local(p):  # this rank's experts: a DTensor's local shard under torchrun, a plain slice in tests
        return p.to_local() if hasattr(p, "to_local") else p


def shard_experts(model: torch.nn.Module, ep: int, ep_rank: int, group=None) -> int:
    """Keep this rank's E/ep experts of every routed-expert module and route through EPExperts. -> modules."""
    n = 0
    for m in model.modules():
        if type(m) is Experts:
            E = m.gate_up_proj.shape[0]
            if E % ep:
                raise ValueError(f"n_routed_experts={E} is not divisible by --ep {ep}")
            part = slice(ep_rank * E // ep, (ep_rank + 1) * E // ep)
            m.gate_up_proj = torch.nn.Parameter(m.gate_up_proj.detach()[part].clone())
            m.down_proj = torch.nn.Parameter(m.down_proj.detach()[part].clone())
            m.__class__, m.ep, m.group = EPExperts, ep, group
            n += 1
    return n
