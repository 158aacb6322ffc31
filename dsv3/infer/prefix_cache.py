"""The prefix cache's second tier: full blocks evicted from the device pool spill to host memory, and from there
to a directory on disk that survives restarts (DeepSeek's "context caching on disk").

A block is stored under its chain hash (which already names the model and every token up to the block's end),
as the latents of all its layers, (layers, block_size, C + Dr). Disk files are safetensors written atomically
(temp + rename) behind a checksum of their bytes; a file that is truncated, corrupt, of another model or of
another cache layout is a miss (and is deleted), never an error or a wrong token. Both tiers are bounded in
bytes and evict the least recently used block first.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_DIGEST = 32  # blake2b bytes in front of each file's safetensors payload


class SpillStore:
    def __init__(self, kv: list[torch.Tensor], model_id: str, host_bytes: int = 0, disk_dir: str | None = None,
                 disk_bytes: int = 16 << 30):
        self.kv, self.model_id = kv, model_id
        self.host_bytes, self.disk_bytes = host_bytes, disk_bytes
        self.host: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.host_used = 0
        self.dir = Path(disk_dir) if disk_dir else None
        self.disk: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recently used first
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            files = sorted(self.dir.glob("*.kv"), key=lambda f: f.stat().st_mtime)
            self.disk.update((f.name, f.stat().st_size) for f in files)
            for tmp in self.dir.glob("*.tmp"):  # a crash mid-write: never a complete-looking file
                tmp.unlink(missing_ok=True)
        self.disk_used = sum(self.disk.values())
        self.hits = {"host": 0, "disk": 0}  # blocks served back from each tier

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.dir is not None

    def put(self, block: int, h: bytes) -> None:
        """Keep a copy of `block` (about to be overwritten, or flushed at shutdown) under `h`."""
        if h in self.host or (self.dir is not None and self._name(h) in self.disk):
            return
        data = torch.stack([pool[block] for pool in self.kv]).to("cpu", copy=True)  # (layers, bs, C + Dr)
        if self.host_bytes > 0:
            self.host[h] = data
            self.host_used += data.nbytes
            while self.host_used > self.host_bytes:  # host overflow goes down to disk
                old, old_data = self.host.popitem(last=False)
                self.host_used -= old_data.nbytes
                self._write(old, old_data)
        else:
            self._write(h, data)

    def rename(self, model_id: str) -> None:
        """A new model identity: blocks stored from now on carry it, and older files no longer verify."""
        self.model_id = model_id
        self.host.clear()
        self.host_used = 0

    def load(self, block: int, h: bytes) -> bool:
        """Copy the stored latents of `h` into pool block `block`; False on a miss."""
        data, tier = self.host.get(h), "host"
        if data is not None:
            self.host.move_to_end(h)
        else:
            data, tier = self._read(h), "disk"
        if data is None or data.shape != (len(self.kv), *self.kv[0].shape[1:]) or data.dtype != self.kv[0].dtype:
            return False
        for pool, layer in zip(self.kv, data):
            pool[block].copy_(layer, non_blocking=True)
        self.hits[tier] += 1
        return True

    @property
    def loaded(self) -> int:
        return sum(self.hits.values())

    def flush(self) -> None:
        """Host-tier blocks to disk (a graceful shutdown keeps them for the next start)."""
        for h, data in list(self.host.items()):
            self._write(h, data)

    # ---- disk ---------------------------------------------------------------------------------------------
    def _name(self, h: bytes) -> str:
        return h.hex() + ".kv"

    def _write(self, h: bytes, data: torch.Tensor) -> None:
        if self.dir is None or self._name(h) in self.disk:
            return
        payload = st_save({"latents": data.contiguous()}, metadata={"model_id": self.model_id})
        blob = hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload
        while self.disk and self.disk_used + len(blob) > self.disk_bytes:
            old, size = self.disk.popitem(last=False)
            (self.dir / old).unlink(missing_ok=True)
            self.disk_used -= size
        if len(blob) > self.disk_bytes:
            return
        path = self.dir / self._name(h)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        self.disk[path.name] = len(blob)
        self.disk_used += len(blob)

    def _read(self, h: bytes) -> torch.Tensor | None:
        name = self._name(h)
        if self.dir is None or name not in self.disk:
            return None
        path = self.dir / name
        try:
            blob = path.read_bytes()
            digest, payload = blob[:_DIGEST], blob[_DIGEST:]
            if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != digest:
                raise ValueError("checksum mismatch")
            tensors = st_load(payload)
            meta = _metadata(payload)
            if meta.get("model_id") != self.model_id:
                raise ValueError("another model's block")
            data = tensors["latents"]
        except Exception:  # truncated, corrupt or foreign: a miss, and the file goes
            path.unlink(missing_ok=True)
            self.disk_used -= self.disk.pop(name, 0)
            return None
        self.disk.move_to_end(name)
        os.utime(path)  # LRU order survives a restart through the file times
        return data


def _metadata(payload: bytes) -> dict:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]).get("__metadata__", {})
