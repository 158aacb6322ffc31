"""Continuous batching: which sequences run in the next forward, and how many of their tokens.

Every step takes, under a token budget: one token for each decoding sequence, the next chunk of each sequence
still in prefill, then new sequences from the waiting queue (first come, first served) while blocks and budget
last. Prefill and decode share the forward. A sequence that needs a block when the pool is empty preempts the
most recently admitted running sequence: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + what it generated so far) when there is room again — never a crash.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv3.infer.kv_cache import BlockPool
from dsv3.infer.prefix_cache import SpillStore
from dsv3.infer.sampler import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One completion being generated: `n` samples of a request are `n` sequences."""
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    wait_for: Sequence | None = None  # a sibling whose prompt blocks this one should reuse: admit after its prefill
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    all_ids: list[int] = field(init=False)  # prompt + output
    blocks: list[int] = field(default_factory=list)  # block table
    hashes: list[bytes] = field(default_factory=list)  # hash chain of the full blocks of all_ids known so far
    num_computed: int = 0  # tokens whose latents are in the cache
    num_registered: int = 0  # leading blocks already named in the prefix cache
    num_cached: int = 0  # prompt tokens the prefix cache supplied at first admission
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list = field(default_factory=list)
    detok: object = None  # the engine's IncrementalDetokenizer
    emitted: int = 0  # characters of detok.text already reported
    draft: list[int] = field(default_factory=list)  # MTP's proposal for the tokens after all_ids
    draft_q: torch.Tensor | None = None  # the distribution the draft was drawn from (sampling only)
    matcher: object = None  # its place in params.grammar (constrained decoding), if any

    def __post_init__(self):
        self.all_ids = list(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Tokens the next forward may cover: the known ones plus the draft under verification."""
        return len(self.all_ids) + len(self.draft)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


@dataclass
class Batch:
    seqs: list[Sequence]
    query_lens: list[int]  # new tokens of each sequence in this forward

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_batched_tokens: int, store: SpillStore | None = None):
        self.pool, self.max_num_seqs, self.max_batched_tokens = pool, max_num_seqs, max_batched_tokens
        self.store = store  # the prefix cache's host / disk tier, if any
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget, seqs, lens = self.max_batched_tokens, [], []
        for seq in list(self.running):  # decode and ongoing prefill first
            if seq not in self.running:  # preempted below by an earlier sequence
                continue
            if seq.num_tokens - seq.num_computed > budget:
                seq.draft, seq.draft_q = [], None  # no room to verify it: plain decode
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.reserve(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                lens.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.wait_for is not None and not seq.wait_for.finished and seq.wait_for.in_prefill:
                break  # FCFS: the sibling's prompt blocks will be ready after its prefill
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            seqs.append(seq)
            lens.append(n)
            budget -= n
        return Batch(seqs, lens)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Reuse the cached prefix, reserve blocks for the first chunk; the chunk's size, or 0 (nothing taken)."""
        bs = self.pool.block_size
        seq.hashes = self.pool.chain_hashes(seq.all_ids, seq.hashes)
        # At least the last token is recomputed: its logits are needed to sample.
        usable = (len(seq.all_ids) - 1) // bs
        blocks = self.pool.match(seq.hashes[:usable])
        for h in seq.hashes[len(blocks):usable] if self.store is not None else ():  # then the second tier
            new = self.pool.allocate(1)
            if new is None or not self.store.load(new[0], h):
                self.pool.release(new or [])
                break
            self.pool.register(new[0], h)
            blocks += new
        first = not seq.output_ids and seq.num_cached == 0
        seq.blocks, seq.num_computed, seq.num_registered = blocks, len(blocks) * bs, len(blocks)
        n = min(len(seq.all_ids) - seq.num_computed, budget)
        if not self.reserve(seq, seq.num_computed + n):
            self.pool.release(seq.blocks)
            seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0
            return 0
        if first:
            self.pool.queries += len(seq.prompt_ids)
            self.pool.hits += seq.num_computed
            seq.num_cached = seq.num_computed
        return n

    def reserve(self, seq: Sequence, n_tokens: int) -> bool:
        """Blocks for the first n_tokens of `seq`; False if the pool is out."""
        need = -(-n_tokens // self.pool.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        seq.blocks += new
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_registered, seq.draft, seq.draft_q = [], 0, 0, [], None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` are in the cache: name the blocks they completed."""
        seq.num_computed += n
        full = min(seq.num_computed, len(seq.all_ids)) // self.pool.block_size  # an accepted draft: next time
        if full > seq.num_registered:
            seq.hashes = self.pool.chain_hashes(seq.all_ids[: full * self.pool.block_size], seq.hashes)
            for i in range(seq.num_registered, full):
                self.pool.register(seq.blocks[i], seq.hashes[i])
            seq.num_registered = full

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
