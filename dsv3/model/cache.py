"""The argument through which the inference engine lends the model its paged latent KV cache.

The model owns no cache buffers. For one forward over a flattened variable-length batch (prefill chunks and
decode tokens of many sequences side by side, T tokens in all) the engine passes:
  - one pool per layer (main layers, then MTP layers): (num_blocks, block_size, C + Dr) holding the
    *normalized* c_kv and the *roped* shared key k_pe of every cached token — 576 values per token for V3;
  - where each new token's latent goes (slot = block · block_size + offset);
  - each sequence's block table and length, and where its new tokens sit in the flat batch.
Attention then runs over the cached blocks with W_UK / W_UV absorbed (SPEC §4.4).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PagedKV:
    kv: list[torch.Tensor]  # per layer: (num_blocks, block_size, C + Dr)
    slot_mapping: torch.Tensor  # (T,) int64: flat slot each new token writes
    block_tables: torch.Tensor  # (B, max_blocks) int64: a sequence's blocks in order
    seq_lens: list[int]  # per sequence: cached + new tokens after this step (host ints: no device sync)
    query_lens: list[int]  # per sequence: new tokens in this step, in flat-batch order
    logits_indices: torch.Tensor | None = None  # flat rows whose logits are wanted (None: all)
    query_start: list[int] = field(init=False)

    def __post_init__(self):
        if len(self.seq_lens) != len(self.query_lens):
            raise ValueError(f"seq_lens has {len(self.seq_lens)} entries but query_lens {len(self.query_lens)}")
        self.query_start = [0]
        for n in self.query_lens:
            self.query_start.append(self.query_start[-1] + n)

    @property
    def block_size(self) -> int:
        return self.kv[0].shape[1]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        pool = self.kv[layer].view(-1, self.kv[layer].shape[-1])  # (slots, C + Dr)
        pool[self.slot_mapping] = torch.cat((c_kv, k_pe), dim=-1).to(pool.dtype)

    def gather(self, layer: int, seq: int) -> torch.Tensor:
        """(S, C + Dr) latent of sequence `seq`, oldest token first."""
        n = self.seq_lens[seq]
        blocks = self.block_tables[seq, : -(-n // self.block_size)]
        return self.kv[layer][blocks].flatten(0, 1)[:n]

