"""Fixed-length training windows from a token file, in a deterministic, resumable order.

Design notes
- Packing: the token stream (documents back to back, each BOS…EOS) is cut into n = (N - 1) // T windows of T + 1
  tokens; window i starts at i·T, so consecutive windows share exactly one token (the last label of one is the
  first input of the next) and every token is a label exactly once per epoch. No padding, no token dropped but
  the tail. Documents cross window edges; `doc_ids` tells the model where they start (attention stays inside a
  document and positions restart), the packed-documents setup of DeepSeek-V3 pretraining.
- Order: epoch e visits the windows in the permutation `default_rng([seed, e])`. The state is (epoch, position):
  a resumed loader recomputes the permutation and continues with exactly the batches an uninterrupted run
  would have seen. The position counts windows, not batches, so a resume may change batch_size.
- Batches are gathered with one fancy index into the memmap: only the pages of the chosen windows are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dsv3.data.tokens import TokenFile


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, input_ids shifted left by one (the next token)
    doc_ids: torch.Tensor  # (B, T) int64, 0 at t=0, +1 at each BOS of input_ids after t=0

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.doc_ids.to(device))


class PackedLoader:
    def __init__(
        self, tokens: TokenFile, seq_len: int, batch_size: int, seed: int = 0, bos_id: int = 0,
        shuffle: bool = True,
    ):  # fmt: skip
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows == 0:
            raise ValueError(
                f"{tokens.path} has {len(tokens)} tokens, too few for one window of seq_len={seq_len} (+1 label)"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.bos_id, self.shuffle = seed, bos_id, shuffle
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        return self.n_windows  # windows per epoch

    def next_batch(self) -> Batch:
        picked = []
        need = self.batch_size
        while need:  # a batch may straddle an epoch boundary; the next epoch's order continues it
            take = self._epoch_order()[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return self._batch(np.concatenate(picked))

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """Windows 0, 1, 2, … in order (the last batch may be smaller); touches no training state."""
        n = self.n_windows if max_batches is None else min(self.n_windows, max_batches * self.batch_size)
        for start in range(0, n, self.batch_size):
            yield self._batch(np.arange(start, min(start + self.batch_size, n)))

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "n_windows": self.n_windows, "shuffle": self.shuffle,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        # These decide which tokens window i holds or where it falls in the order: resuming across a change
        # would silently replay or skip data. batch_size may change (see the design notes).
        for field in ("seq_len", "n_windows", "seed", "shuffle"):
            if field in state and state[field] != getattr(self, field):
                raise ValueError(f"loader state has {field}={state[field]}, this loader has {getattr(self, field)}")
        if not 0 <= state["position"] < self.n_windows:
            raise ValueError(f"loader state position={state['position']} outside [0, {self.n_windows})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:  # one permutation per epoch, computed when the epoch starts
            n = self.n_windows
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def _batch(self, windows: np.ndarray) -> Batch:
        T = self.seq_len
        index = windows[:, None] * T + np.arange(T + 1)  # (B, T+1) token positions
        w = torch.from_numpy(np.asarray(self.tokens.tokens[index]).astype(np.int64))  # (B, T+1)
        inputs, labels = w[:, :-1], w[:, 1:]
        starts = inputs == self.bos_id  # (B, T)
        starts[:, 0] = False  # the window's first token opens document 0 whether or not it is a BOS
        return Batch(inputs.contiguous(), labels.contiguous(), starts.cumsum(dim=1))
