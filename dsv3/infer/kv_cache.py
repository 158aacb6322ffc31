"""The paged latent KV cache: one preallocated pool of fixed-size blocks per layer, and the bookkeeping of which
sequence owns which block, with a prefix cache over full blocks.

What a block holds is MLA's normalized latent c_kv and the roped shared key k_pe of `block_size` tokens
((C + Dr) values per token per layer: 576 for V3, never per-head K/V). Sequences own lists of block ids (their
block tables), so any mix of lengths shares the pool without fragmentation.

Prefix cache: once a block is full, it is named by a hash chain over the tokens up to its end (plus the model's
identity), so a later request whose prompt starts with the same tokens reuses the block instead of recomputing
it. Blocks nobody references stay cached until their slot is needed; then the least recently released goes.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict, deque

import numpy as np
import torch

from dsv3.config import ModelConfig


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, extra_layers: int = 0) -> int:
    """Cache bytes per token: (C + Dr) × (layers + MTP layers used for drafting) × element size."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (cfg.num_hidden_layers + extra_layers) * dtype.itemsize


def default_cache_bytes(device: torch.device, fraction: float) -> int:
    """KV pool budget: `fraction` of the free GPU memory, or of the available host memory on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction)


def allocate_pools(cfg: ModelConfig, num_blocks: int, block_size: int, n_layers: int, dtype, device):
    """One (num_blocks, block_size, C + Dr) tensor per layer; what PagedKV.kv takes (paged_kv.py)."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device) for _ in range(n_layers)]


class BlockPool:
    """Ownership of the pool's blocks: reference counts, a free list, and the prefix cache's hash table."""

    def __init__(self, num_blocks: int, block_size: int, model_id: str):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.rename(model_id)  # sets seed (the hash chain's start: model identity), hash, by_hash, free, cached
        self.hits = self.queries = 0  # prompt tokens served from / looked up in the prefix cache
        self.spill = None  # called as spill(block, hash) before a cached block is overwritten (second tier)

    def rename(self, model_id: str) -> None:
        """The model changed (new weights): forget every cached block, and chain new hashes from `model_id`.
        Only while no sequence holds blocks."""
        if any(self.ref):
            raise RuntimeError("the block pool is in use: rename it only when no sequence runs")
        self.model_id = model_id
        self.seed = hashlib.blake2b(model_id.encode(), digest_size=16).digest()
        self.hash: list[bytes | None] = [None] * self.num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(self.num_blocks))  # unreferenced, holding nothing reusable
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced but hashed; least recent first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    def chain_hashes(self, tokens: list[int], start: list[bytes]) -> list[bytes]:
        """Hashes of every full block of `tokens`, extending `start` (the hashes already known)."""
        out, bs = list(start), self.block_size
        for i in range(len(out), len(tokens) // bs):
            prev = out[-1] if out else self.seed
            chunk = np.asarray(tokens[i * bs:(i + 1) * bs], dtype=np.int64).tobytes()
            out.append(hashlib.blake2b(prev + chunk, digest_size=16).digest())
        return out

    def match(self, hashes: list[bytes]) -> list[int]:
        """The longest run of cached blocks from the first: takes a reference on each."""
        blocks = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            blocks.append(b)
        for b in blocks:
            self._ref(b)
        return blocks

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently used cached ones if needed), or None if too few."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:  # evict: the block's contents are about to be overwritten
                b, _ = self.cached.popitem(last=False)
                if self.spill is not None:
                    self.spill(b, self.hash[b])
                del self.by_hash[self.hash[b]]
                self.hash[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block; the tail of a sequence is evicted before its head."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash[b] is None:
                    self.free.append(b)
                else:
                    self.cached[b] = None

    def register(self, block: int, h: bytes) -> None:
        """`block` is full and holds the tokens named by `h`: make it findable (first writer wins)."""
        if self.hash[block] is None and h not in self.by_hash:
            self.hash[block] = h
            self.by_hash[h] = block

    def _ref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.cached.pop(b, None)
        self.ref[b] += 1
