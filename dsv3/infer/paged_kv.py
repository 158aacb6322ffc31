"""The argument through which the inference engine lends a forward its paged latent KV cache.

The model owns no cache buffers (kv_cache.py allocates the pools). For one forward over a flattened
variable-length batch (prefill chunks and decode tokens of many sequences side by side, T tokens in all) the
engine passes:
  - one pool per layer (main layers, then MTP layers): (num_blocks, block_size, C + Dr) holding the
    *normalized* c_kv and the *roped* shared key k_pe of every cached token — 576 values per token for V3;
  - where each new token's latent goes (slot = block · block_size + offset);
  - each sequence's block table and length, and where its new tokens sit in the flat batch.
The engine's MLA (attention.py) then attends over the cached blocks, with W_UK / W_UV absorbed for decode rows
(docs/architecture.md#absorbed-attention).

A decode step (every new token a decode token or a speculative verification row) may instead give one block table
and cache length per token as device tensors (`row_lens`) and no host lists at all: nothing in the forward then
depends on host values, which is what lets the engine capture it in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


ABSORBED_MAX_QUERY = 4  # sequences with at most this many new tokens use the absorbed path (decode, MTP checks)


@dataclass
class PagedKV:
    kv: list[torch.Tensor]  # per layer: (num_blocks, block_size, C + Dr)
    slot_mapping: torch.Tensor  # (T,) int64: flat slot each new token writes
    block_tables: torch.Tensor  # (B, max_blocks) int64: a sequence's blocks in order
    seq_lens: list[int] | None  # per sequence: cached + new tokens after this step (host ints: no device sync)
    query_lens: list[int] | None  # per sequence: new tokens in this step, in flat-batch order
    logits_indices: torch.Tensor | None = None  # flat rows whose logits are wanted (None: all)
    row_lens: torch.Tensor | None = None  # instead of seq_lens / query_lens: every token is an absorbed row with
    # its own row of block_tables (T, max_blocks), seeing this many cache rows (T,)
    query_start: list[int] = field(init=False)
    decode: list[int] = field(init=False)  # sequences with few new tokens: each row on the absorbed path
    decode_rows: torch.Tensor | None = field(init=False, default=None)  # those rows in the flat batch
    decode_lens: torch.Tensor | None = field(init=False, default=None)  # the cache length each row sees
    decode_tables: torch.Tensor | None = field(init=False, default=None)  # each row's block table

    def __post_init__(self):
        if self.row_lens is not None:
            self.query_start, self.decode = [], []
            return
        if len(self.seq_lens) != len(self.query_lens):
            raise ValueError(f"seq_lens has {len(self.seq_lens)} entries but query_lens {len(self.query_lens)}")
        self.query_start = [0]
        for n in self.query_lens:
            self.query_start.append(self.query_start[-1] + n)
        # Device copies made once per step, not once per layer: a copy from pageable host memory waits for the
        # GPU to drain, so one inside the layer loop would serialize every layer's launches with its kernels.
        # Decode tokens and speculative verification rows go through absorbed attention, one row per token:
        # new token i of a sequence with q new tokens sees the first (seq_len - q + 1 + i) cache rows.
        self.decode = [b for b, n in enumerate(self.query_lens) if 0 < n <= ABSORBED_MAX_QUERY]
        if self.decode:
            dev = self.block_tables.device
            each = [(b, i) for b in self.decode for i in range(self.query_lens[b])]
            self.decode_rows = to_device([self.query_start[b] + i for b, i in each], dev)
            self.decode_lens = to_device([self.seq_lens[b] - self.query_lens[b] + 1 + i for b, i in each], dev)
            seqs = [b for b, _ in each]
            self.decode_tables = (self.block_tables if seqs == list(range(len(self.seq_lens)))
                                  else self.block_tables[to_device(seqs, dev)])

    @property
    def block_size(self) -> int:
        return self.kv[0].shape[1]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        _write(self.kv[layer], self.slot_mapping, torch.cat((c_kv, k_pe), dim=-1).to(self.kv[layer].dtype))

    def gather(self, layer: int, seq: int) -> torch.Tensor:
        """(S, C + Dr) latent of sequence `seq`, oldest token first."""
        n = self.seq_lens[seq]
        blocks = self.block_tables[seq, : -(-n // self.block_size)]
        return self.kv[layer][blocks].flatten(0, 1)[:n]


@torch.library.custom_op("dsv3::kv_write", mutates_args=("pool",))
def _write(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """pool (blocks, block_size, W) rows at flat `slots` = rows (T, W). An op of its own so that torch.compile
    writes the pool in place instead of functionalizing the write into a copy of the whole pool."""
    pool.view(-1, pool.shape[-1])[slots] = rows


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor on `device` without stalling the GPU: staged in pinned memory, copied asynchronously."""
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
