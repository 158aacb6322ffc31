"""Training on several processes with torch.distributed: `torchrun --nproc-per-node N -m dsv3 train ...`.

Data parallelism with FSDP2 (`fully_shard` per block, then the root) and expert parallelism (`--ep`: routed
experts split over groups of consecutive ranks, all-to-all dispatch and combine; `EPExperts`), NCCL on GPUs and
gloo on CPUs. Pipeline parallelism (`--pp`, dsv3/train/pipeline.py) combines with both: each stage is sharded
over its data-parallel ranks.
`--batch-size` is the global batch: every rank reads the same global micro-batch from the loader (the order a
single process would see) and trains on its 1/dp slice, so one command trains on the same data whatever the
layout, and the run equals the single-process one up to float rounding (tests/test_parallel.py). The model code
stays single-device: the trainer transforms the built model in a fixed order, pipeline split → expert
parallelism → activation checkpointing → compile (inside each block) → FSDP2. Gradient clipping sees the
global norm; the aux-loss-free balance bias is updated from expert loads summed over all ranks, so every rank
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

from dsv3.kernels.moe import accumulation_dtype
from dsv3.model.moe import Experts
from dsv3.runtime import resolve_device
from dsv3.train.config import TrainConfig
from dsv3.train.pipeline import n_stages, pipeline_microbatches


@dataclass(frozen=True)
class Layout:
    """Where this process sits. Ranks are laid out pp-major: rank = pp_rank · dp + dp_rank, and an expert-parallel
    group is `ep` consecutive data-parallel ranks of one pipeline stage."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp: int = 1  # data-parallel ranks per pipeline stage (world / pp)
    dp_rank: int = 0
    ep: int = 1
    pp: int = 1
    pp_rank: int = 0
    distributed: bool = False  # launched by torchrun: the parallel code path, even with one process

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's part of n sequences of a global micro-batch."""
        per = n // self.dp
        return slice(self.dp_rank * per, (self.dp_rank + 1) * per)


def layout_errors(cfg: TrainConfig, world: int, n_experts: int, n_layers: int | None = None) -> list[str]:
    par, errors = cfg.parallel, []
    if par.pp < 1 or world % par.pp:
        return [f"--pp {par.pp} does not divide the world size {world}"]
    stages = n_stages(par.pp, par.pp_schedule)
    if par.pp > 1 and n_layers is not None and n_layers < stages:
        errors.append(f"the model's {n_layers} layers cannot fill {stages} pipeline stages (--pp {par.pp} "
                      f"--pp-schedule {par.pp_schedule}{': two stages per rank' if stages > par.pp else ''})")
    dp = world // par.pp
    mb = cfg.micro_batch_size or cfg.batch_size
    if par.dp_shard not in (-1, dp):
        errors.append(f"--dp-shard {par.dp_shard} does not fit {world} processes with --pp {par.pp} (every process "
                      f"of a pipeline stage is a data-parallel rank: dp-shard must be -1 or {dp})")
    elif cfg.batch_size % dp or mb % dp:
        errors.append(f"--batch-size {cfg.batch_size} and --micro-batch-size {cfg.micro_batch_size} (global) must "
                      f"be multiples of the {dp} data-parallel ranks")
    elif par.pp > 1 and (mb // dp) % pipeline_microbatches(par):
        errors.append(f"each data-parallel rank's {mb // dp} sequences of a micro-batch must split into "
                      f"{pipeline_microbatches(par)} pipeline micro-batches")
    if par.ep < 1 or dp % par.ep:
        errors.append(f"--ep {par.ep} does not divide the {dp} data-parallel ranks (world size {world}"
                      f"{f' / --pp {par.pp}' if par.pp > 1 else ''})")
    elif n_experts % par.ep:
        errors.append(f"--ep {par.ep} does not divide the model's n_routed_experts={n_experts}")
    if par.ep > 1 and cfg.precision == "fp8" and cfg.fp8_experts:
        errors.append("--fp8-experts does not combine with --ep yet (FP8 linears do)")
    return errors


def init(cfg: TrainConfig, n_experts: int, n_layers: int) -> Layout:
    """Read torchrun's environment, check the layout (one clear error on rank 0 before any work), join the
    process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    errors = layout_errors(cfg, world, n_experts, n_layers)
    if errors:
        if rank:
            sys.exit(1)
        raise ValueError("; ".join(errors))
    if "RANK" not in os.environ:  # a plain `dsv3 train`
        return Layout()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(cfg.runtime.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    par = cfg.parallel
    dp = world // par.pp
    return Layout(rank=rank, world=world, local_rank=local, dp=dp, dp_rank=rank % dp, ep=par.ep, pp=par.pp,
                  pp_rank=rank // dp, distributed=True)


def meshes(layout: Layout, device_type: str) -> dict:
    """'dp': the 1-D mesh of this stage's data-parallel ranks (FSDP2); 'ep': with --ep, the 2-D (dp_replicate,
    ep) mesh of the same ranks (experts split over 'ep', replicated over 'dp_replicate'); 'pp': with --pp, the
    process group of this rank's pipeline."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, (layout.pp, layout.dp), mesh_dim_names=("pp", "dp"))
    ep = init_device_mesh(device_type, (layout.pp, layout.dp // layout.ep, layout.ep),
                          mesh_dim_names=("pp", "dp_replicate", "ep")) if layout.ep > 1 else None
    return {"dp": mesh["dp"], "ep": ep["dp_replicate", "ep"] if ep else None,
            "pp": mesh["pp"].get_group() if layout.pp > 1 else None}


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks and MTP modules of a model or of a pipeline stage, in forward order."""
    layers = model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers
    return [*layers, *model.mtp]


def apply_parallelism(model: torch.nn.Module, layout: Layout, mesh: dict | None, checkpointing: bool = False,
                      compile: bool = False) -> None:
    """The transforms of a built model (or of one pipeline stage, after the split) in their fixed order: expert
    parallelism, activation checkpointing, compile (inside each block: DualPipeV refuses compiled stages), FSDP2
    (not for a pipeline stage alone on its ranks). The model code stays single-device."""
    if layout.ep > 1:
        expert_parallel(model, layout, mesh)
    for block in blocks(model):
        if checkpointing:
            block.forward = _checkpointed(block.forward)
        if compile:
            block.compile()
    if layout.distributed and (layout.pp == 1 or layout.dp > 1):
        shard(model, layout, mesh)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def expert_parallel(model: torch.nn.Module, layout: Layout, mesh: dict) -> None:
    """Split every routed-expert module of `model` over its EP group (DTensors on the 'ep' mesh, so checkpoints
    see all E experts) and route it through EPExperts."""
    from torch.distributed.tensor import Shard, distribute_tensor
    for m in model.modules():
        if type(m) is Experts:
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(m, name).detach()
                setattr(m, name, torch.nn.Parameter(distribute_tensor(full, mesh["ep"]["ep"], [Shard(0)])))
            m.__class__, m.ep, m.group = EPExperts, layout.ep, mesh["ep"]["ep"].get_group()


def shard(model: torch.nn.Module, layout: Layout, mesh: dict) -> None:
    """FSDP2 for `model` (the whole model, or one pipeline stage): the experts over the ranks that hold the same
    experts, each block over the data-parallel ranks, then the root."""
    from torch.distributed.fsdp import fully_shard
    # A pipeline stage keeps its weights gathered from forward to backward (as torchtitan does): its micro-batches
    # would gather them again each time, and under DualPipeV (torch 2.13) units resharded after forward in the
    # last stage got wrong gradients. The last block's weights are needed again at once by backward anyway.
    keep = layout.pp > 1
    for m in model.modules():
        if isinstance(m, EPExperts):  # averaged over the dp / ep replicas; scale_expert_grads does the rest
            fully_shard(m, mesh=mesh["ep"]["dp_replicate"], reshard_after_forward=not keep)
    if layout.dp > 1:  # one data-parallel rank has nothing to shard or overlap: the root alone, one unit (each
        # unit costs CPU time per all-gather and per reduce-scatter; measured: docs/training.md)
        for layer in model.mtp:  # the root calls an MTP module's final norm outside the module's forward
            fully_shard(layer.shared_head.norm, mesh=mesh["dp"], reshard_after_forward=not keep)
        units = blocks(model)
        for i, block in enumerate(units):
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=not keep and i < len(units) - 1)
        for name in ("embed_tokens", "norm", "lm_head"):  # units of their own, not the root's: under DualPipeV
            # the root's own gradients missed a micro-batch (torch 2.13), a sub-module's do not
            if getattr(model, name, None) is not None:
                fully_shard(getattr(model, name), mesh=mesh["dp"],
                            reshard_after_forward=not keep and name == "embed_tokens")
    fully_shard(model, mesh=mesh["dp"], reshard_after_forward=False)


def scale_expert_grads(model: torch.nn.Module, layout: Layout) -> None:
    """Each rank's loss is the mean over its own tokens and an expert's gradient sums the rows of its EP group's
    ep ranks; FSDP then averages over the dp / ep replicas: 1/ep more gives the 1/dp of one process over the whole
    batch. (FSDP's own divide factor would need ReduceOp.PREMUL_SUM, which gloo lacks.)"""
    for m in model.modules() if layout.ep > 1 else ():
        if isinstance(m, EPExperts):
            for p in (m.gate_up_proj, m.down_proj):
                if p.grad is not None:
                    _local(p.grad).div_(layout.ep)


def clip_grad_norm(params, max_norm: float, layout: Layout = Layout(), optimizer=None) -> torch.Tensor:
    """The global gradient norm, clipped to max_norm. Every gradient element lives on exactly one rank (FSDP and
    expert shards, pipeline stages), so the squares of the local shards summed over all ranks are the square of
    the global norm: one all-reduce on plain local tensors (each DTensor op costs CPU time; measured:
    docs/training.md).

    Given torch's fused Adam(W) `optimizer` (one process), the gradients are left as they are and the clip
    factor goes to its step as `grad_scale` (which it divides by), saving a pass over every gradient."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    squares = torch.nn.utils.get_total_norm(grads).float().pow(2)
    if layout.distributed:
        dist.all_reduce(squares)
    total = squares.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and optimizer.defaults.get("fused") \
            and not layout.distributed:
        optimizer.grad_scale = 1 / coef
        return total
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._foreach_mul_(group, coef.to(group[0].dtype))
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (parameter or gradient); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.distributed:
        dist.all_reduce(t)
    return t


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


class EPExperts(Experts):
    """Routed experts sharded over an expert-parallel group of `ep` ranks: this rank holds experts
    [r·E/ep, (r+1)·E/ep). Dispatch sends each token once to each rank that holds any of its experts (DeepSeek-V3's
    node-limited dispatch: with group-limited routing and expert groups aligned to ranks, a token reaches at most
    topk_group ranks, and K experts cost at most that many rows, not K): the row counts go first (all_to_all),
    then the rows, each with its K routing weights and the local ids of its experts on that rank (-1 for experts
    elsewhere) as 2K extra columns (all_to_all_single, split by destination rank). The receiver expands them to
    (row, expert) pairs, runs the same SwiGLU as one process would, and sums each row's pairs in slot order.
    Combine: one partial sum per (token, rank) goes back and the origin sums its ranks' in rank order. Both
    exchanges are differentiable, so backward sends the gradients back along the same routes."""

    group = None
    ep = 1
    rows_sent = 0  # rows this rank dispatched in its last forward (≤ tokens · min(K, ep))

    def forward(self, x_ND, w_NK, idx_NK):
        (N, K), D, R = idx_NK.shape, x_ND.shape[-1], self.ep
        gate_up, down = _local(self.gate_up_proj), _local(self.down_proj)  # this rank's experts
        E_local = gate_up.shape[0]
        counts_E = torch.zeros(E_local * R, dtype=torch.int64, device=idx_NK.device).scatter_add_(
            0, idx_NK.flatten(), torch.ones_like(idx_NK.flatten()))
        dest_NK = idx_NK // E_local
        r_M, t_M = torch.zeros(N, R, dtype=torch.bool, device=x_ND.device).scatter_(1, dest_NK, True).T.nonzero(
            as_tuple=True)  # one row per (token, destination rank), grouped by destination
        here_MK = dest_NK[t_M] == r_M[:, None]
        local_MK = torch.where(here_MK, idx_NK[t_M] - r_M[:, None] * E_local, -1)  # exact in bf16: E_local ≤ 256
        rows = torch.cat([x_ND[t_M], (w_NK[t_M] * here_MK).to(x_ND.dtype), local_MK.to(x_ND.dtype)], dim=-1)
        send_R = torch.bincount(r_M, minlength=R)
        recv_R = torch.empty_like(send_R)
        dist.all_to_all_single(recv_R, send_R, group=self.group)
        send, recv = send_R.tolist(), recv_R.tolist()  # host sync
        self.rows_sent = len(t_M)
        got = dnn.all_to_all_single(rows.new_empty(sum(recv), D + 2 * K), rows, recv, send, group=self.group)
        row_P, slot_P = (got[:, D + K:] >= 0).nonzero(as_tuple=True)  # (received row, slot) pairs held here
        e_P = got[row_P, D + K + slot_P].round().long()
        perm = e_P.argsort(stable=True)
        row_P, slot_P = row_P[perm], slot_P[perm]
        offs = torch.bincount(e_P, minlength=E_local).cumsum(0).to(torch.int32)
        y_P = self.ffn(got[row_P, :D], got[row_P, D + slot_P], offs, gate_up, down)
        y_MKD = y_P.new_zeros(len(got), K, y_P.shape[-1]).index_put((row_P, slot_P), y_P)
        y_M = y_MKD.sum(1, dtype=accumulation_dtype(y_P.dtype)).to(y_P.dtype)
        back = dnn.all_to_all_single(y_M.new_empty(len(t_M), y_M.shape[-1]), y_M, send, recv, group=self.group)
        y_NRD = back.new_zeros(N, R, back.shape[-1]).index_put((t_M, r_M), back)
        return y_NRD.sum(1, dtype=accumulation_dtype(x_ND.dtype)).to(x_ND.dtype), counts_E
