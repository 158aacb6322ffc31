"""Decode steps as CUDA graphs: the host launches one graph per step instead of a few hundred kernels.

A decode step's forward — every new token an absorbed row (docs/architecture.md#absorbed-attention): plain decode
tokens, speculative verification rows, MTP draft rows — reads its inputs from device buffers only and never waits for
the host, so for a fixed row count it can be recorded once and replayed. Row counts are bucketed (1, 2, 4, 8, then
multiples of 16); a step with T rows pads to the next bucket: padding rows read block `scratch` and write only its
first slot, a block the pool never hands out. A bucket is recorded the first time a step needs it, or all of them
by `Engine.warmup()`.

While a graph is recorded, the model's forward runs torch.compile'd as a whole (`WHOLE_FORWARD`; dynamic shapes:
one compile serves every bucket but batch 1), so the graph holds Inductor's fused kernels between the GEMMs and
the opaque custom ops (the Triton kernels, the cache write). A prefill step on a GPU runs compiled pieces instead
(RMSNorm, the projections with rope, routing, the SwiGLU MLPs, the routed experts' glue), whose Python-level spans
a whole compile would specialize on. The model's eager code is untouched: the compiled versions stand in only
while a graph is recorded or a GPU prefill runs. A graph of compiled kernels replays faster than one of eager
kernels, the whole forward slightly faster than compiled pieces, at the cost of a longer warmup (measured:
docs/inference.md#cuda-graphs).

Without CUDA (or with graphs off) the same forward runs eagerly on exactly T rows, so CPU tests exercise the code
path that the graphs record.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from dsv3.fp8.inference import Fp8WeightExperts
from dsv3.infer.paged_kv import PagedKV, to_device
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, Experts, Gate
from dsv3.model.norm import RMSNorm
from dsv3.model.transformer import Transformer

Forward = Callable[[PagedKV, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]]


# The model's methods (and FP8 experts' own forward); the engine's overrides (transform.py: fused projections, the
# decode router) are hooks these methods call, so a compiled piece traces through them.
_FUSED = ((RMSNorm, "forward"), (MLA, "_project"), (Gate, "forward"), (MLP, "forward"),
          (Experts, "forward"), (Fp8WeightExperts, "forward"))
_compiled: dict[tuple[type, str], Callable] = {}


# Decode graphs compile the model's forward whole (the module docstring says why). One graph for all layers: a
# compiled block would recompile per layer for its cache index.
WHOLE_FORWARD = True


@contextmanager
def fused_pieces(whole_forward: bool = False):
    """The `_FUSED` methods (and with `whole_forward`, Transformer.forward) replaced by their torch.compile'd
    versions for the duration (see the module docstring)."""
    fused = _FUSED + (((Transformer, "forward"),) if whole_forward else ())
    eager = [(cls, name, cls.__dict__[name]) for cls, name in fused]
    try:
        for cls, name, fn in eager:
            if (cls, name) not in _compiled:
                _compiled[cls, name] = torch.compile(fn, dynamic=True)
            setattr(cls, name, _compiled[cls, name])
        yield
    finally:
        for cls, name, fn in eager:
            setattr(cls, name, fn)


def buckets(max_rows: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, *range(16, max_rows, 16)) if b < max_rows] + [max_rows]


class DecodeRunner:
    """`fn(cache, ids, positions, hidden)` over T absorbed rows, eager or replayed from a CUDA graph."""

    def __init__(self, fn: Forward, kv: list[torch.Tensor], scratch: int, max_rows: int, max_blocks: int,
                 hidden_size: int | None = None, graphs: bool = True):
        self.fn, self.kv, self.scratch, self.max_rows = fn, kv, scratch, max_rows
        dev = kv[0].device
        self.graphs = graphs and dev.type == "cuda"
        self.buckets = buckets(max_rows)
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        if not self.graphs:
            return
        self.pool = torch.cuda.graph_pool_handle()
        self.ints = torch.zeros(4 * max_rows, dtype=torch.long, device=dev)  # ids, positions, slots, lens
        self.tables = torch.full((max_rows, max_blocks), scratch, dtype=torch.int32, device=dev)
        self.hidden = (torch.zeros(max_rows, hidden_size, dtype=kv[0].dtype, device=dev)
                       if hidden_size is not None else None)

    def __call__(self, ids: list[int] | torch.Tensor, pos: list[int], slots: list[int], tables: list[list[int]],
                 lens: list[int], hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One row per entry: token id (a host list, or already on the device), position, the slot its latent
        goes to, its sequence's block table and the number of cache rows it sees (itself included). Returns fn's
        outputs for these T rows."""
        T = len(ids)
        dev = self.kv[0].device
        on_device = isinstance(ids, torch.Tensor)
        if not self.graphs or T > self.max_rows:
            w = max(map(len, tables))
            table = to_device([t + [self.scratch] * (w - len(t)) for t in tables], dev)
            cache = PagedKV(self.kv, to_device(slots, dev), table, None, None, row_lens=to_device(lens, dev))
            return self.fn(cache, ids if on_device else to_device(ids, dev), to_device(pos, dev), hidden)
        B = next(b for b in self.buckets if b >= T)
        if B not in self.captured:
            self.captured[B] = self._capture(B)
        pad, bs = B - T, self.kv[0].shape[1]
        staged = torch.tensor([[0] * B if on_device else ids + [0] * pad, pos + [0] * pad,
                               slots + [self.scratch * bs] * pad, lens + [1] * pad], dtype=torch.long).pin_memory()
        self.ints[: 4 * B].copy_(staged.view(-1), non_blocking=True)
        if on_device:
            self.ints[:T].copy_(ids)
        # Only the columns these rows use: the kernel never reads a table past a row's length, and padding
        # rows (length 1) read column 0, which is a real block (harmless) or the scratch block.
        w = max(map(len, tables))
        staged = torch.tensor([t + [self.scratch] * (w - len(t)) for t in tables], dtype=torch.int32).pin_memory()
        self.tables[:T, :w].copy_(staged, non_blocking=True)
        if hidden is not None:
            self.hidden[:T].copy_(hidden)
        graph, outs = self.captured[B]
        graph.replay()
        return tuple(o[:T] for o in outs)

    def _run(self, B: int) -> tuple[torch.Tensor, ...]:
        ids, pos, slots, lens = self.ints[: 4 * B].view(4, B)
        cache = PagedKV(self.kv, slots, self.tables[:B], None, None, row_lens=lens)
        return self.fn(cache, ids, pos, None if self.hidden is None else self.hidden[:B])

    def capture_all(self) -> None:
        for B in self.buckets if self.graphs else ():
            if B not in self.captured:
                self.captured[B] = self._capture(B)

    def _capture(self, B: int):
        # Recorded on padding rows (they write only the scratch block). Warm up on a side stream first (Triton
        # compiles its kernel, cuBLAS picks its algorithms, torch.compile compiles), then record.
        ids, pos, slots, lens = self.ints[: 4 * B].view(4, B)
        ids.zero_(), pos.zero_(), slots.fill_(self.scratch * self.kv[0].shape[1]), lens.fill_(1)
        self.tables[:B].fill_(self.scratch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with fused_pieces(whole_forward=WHOLE_FORWARD):
            with torch.cuda.stream(side):
                self._run(B)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outs = self._run(B)
        return graph, outs
