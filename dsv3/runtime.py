"""Where a process runs: the device it computes on (`--device`), and how the host allocator keeps freed memory.

Training, fine-tuning, the inference engine and the server all choose their device here, by one convention:
`auto` (or no choice) means CUDA when torch sees a GPU, else the CPU.
"""
from __future__ import annotations

import ctypes

import torch

from dsv3.options import option


def device_option():
    """The `--device` field of every command that runs a model (training's RuntimeConfig, inference's
    LoadConfig): one help text, one default."""
    return option("auto", help="cpu, cuda, cuda:N, or auto: cuda when torch sees a GPU, else cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`--device` -> torch.device: None or "auto" picks CUDA when available, else the CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> None:
    """CPU work (training steps, engine steps): keep large freed blocks in the heap instead of handing them back.

    By default glibc serves every block above its mmap threshold (128 KB, adapting up to 32 MB) with a fresh mmap
    and unmaps it when freed, so each step's large temporaries (activations; logits of rows x V fp32, 4 MB for 8
    rows of DeepSeek's vocabulary) page-fault in afresh every step. The values:
    - MMAP_THRESHOLD 256 MB: a step's temporaries come from the heap and are reused; blocks larger than that (a
      model's weights, the engine's KV pool: allocated once, kept for the process's life) still get their own
      mapping, so freeing one returns its memory.
    - TRIM_THRESHOLD 2 GB: the heap's free top is never trimmed below a step's peak, which the next step reaches
      again anyway (a long idle server keeps at most that much).
    The same thing PyTorch's CPU tuning guide gets from jemalloc / tcmalloc (and vLLM's CPU backend from a
    preloaded tcmalloc), without preloading a library. Process-wide; a no-op without glibc's mallopt (macOS, musl).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
