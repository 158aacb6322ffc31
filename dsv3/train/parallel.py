"""Training on several processes with torch.distributed: `torchrun --nproc-per-node N -m dsv3 train ...`.

Today: data parallelism with FSDP2 (`fully_shard` per block, then the root), NCCL on GPUs and gloo on CPUs.
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


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def slice(self, n: int) -> slice:
        """This rank's part of n sequences of a global micro-batch."""
        per = n // self.dp
        return slice(self.rank * per, (self.rank + 1) * per)


def layout_errors(cfg, world: int) -> list[str]:
    dp = world if cfg.dp_shard == -1 else cfg.dp_shard
    errors = []
    if dp < 1 or world % dp or dp != world:
        errors.append(f"--dp-shard {cfg.dp_shard} does not fit the world size {world} (data parallelism is the "
                      "only layout so far: dp-shard must be -1 or the number of processes)")
    elif cfg.batch_size % dp or (cfg.micro_batch_size or cfg.batch_size) % dp:
        errors.append(f"--batch-size {cfg.batch_size} and --micro-batch-size {cfg.micro_batch_size} (global) must "
                      f"be multiples of dp-shard={dp}")
    return errors


def init(cfg) -> Layout:
    """Read torchrun's environment, check the layout (one clear error on rank 0 before any work), join the
    process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    errors = layout_errors(cfg, world)
    if errors:
        if rank:
            sys.exit(1)
        raise ValueError("; ".join(errors))
    if world == 1:
        return Layout()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Layout(rank=rank, world=world, local_rank=local, dp=world)


def shard(model: torch.nn.Module, layout: Layout, device: torch.device) -> torch.nn.Module:
    """FSDP2: each decoder block (and MTP module) its own unit, then the root (embedding, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (layout.dp,), mesh_dim_names=("dp_shard",))
    for layer in model.mtp:  # the root calls an MTP module's final norm outside the module's forward
        fully_shard(layer.shared_head.norm, mesh=mesh)
    for block in (*model.layers, *model.mtp):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.distributed:
        dist.all_reduce(t)
    return t


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()
