"""One file per op: a torch reference, a fast path where the hardware has one, and one public function.

Triton is optional (a CPU-only install runs the references). Kernels run on CUDA tensors, or anywhere under
TRITON_INTERPRET=1, which is how CI tests them on a CPU (Triton reads the variable when it is imported).
"""
import os

import torch

try:
    import triton
except ImportError:  # CPU-only installs: the torch references serve
    triton = None


def interpreting() -> bool:
    """Triton kernels run in Triton's (numpy) interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like `x` (rather than the torch references)."""
    return triton is not None and (x.is_cuda or interpreting())
