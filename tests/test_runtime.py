"""dsv3/runtime.py: the one device convention, and the allocator setting that keeps a step's freed memory."""
import subprocess
import sys
import textwrap

import pytest
import torch

from dsv3.runtime import resolve_device


def test_resolve_device_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want and resolve_device(None).type == want and resolve_device().type == want
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named devices are taken as they are
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


REALLOCATE = textwrap.dedent("""
    import resource, sys, torch
    from dsv3.runtime import keep_freed_memory
    if sys.argv[1] == "keep":
        keep_freed_memory()
    x = torch.ones(16 << 20)  # 64 MB: above glibc's largest dynamic mmap threshold (32 MB)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(16 << 20)
        del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_a_freed_block_instead_of_faulting_it_in_again():
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(out.stdout.split()[-1])
    # By default each 64 MB block is a fresh mapping whose pages all fault in again; kept, the heap serves it.
    assert faults["keep"] < faults["default"] / 2
