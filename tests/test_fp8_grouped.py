"""FP8 grouped GEMMs (dsv3/fp8/grouped.py): the Triton kernels against the torch references under Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so each check runs in a fresh interpreter,
which imports this file and calls a `check_*` function), and the references against a float64 computation written
out independently (full dequantization, then one einsum per expert over its real rows)."""
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import run_fresh

from dsv3.fp8.grouped import (grouped_fp8_mm, grouped_fp8_mm_reference, grouped_fp8_mm_wgrad,
                              grouped_fp8_mm_wgrad_reference)
from dsv3.kernels import use_triton

FP8 = torch.float8_e4m3fn
F64 = dict(out_dtype=torch.float64, compute_dtype=torch.float64)


def make_case(sizes, N, K, tail, seed=0, zero_pad=False):
    """Groups of `sizes` real rows, each padded to 128, then `tail` unused rows; operands of both GEMMs.

    Padding is random fp8 unless zero_pad, which zeroes the rows padding a group (as the caller does)."""
    g = torch.Generator().manual_seed(seed)
    padded = [-(-n // 128) * 128 for n in sizes]
    starts = [sum(padded[:e]) for e in range(len(sizes))]
    offs = torch.tensor(padded).cumsum(0).to(torch.int32)
    R = int(offs[-1]) + tail
    real_R = torch.zeros(R, dtype=torch.bool)
    for s, n in zip(starts, sizes):
        real_R[s:s + n] = True
    keep_R = real_R | (torch.arange(R) >= offs[-1]) if zero_pad else torch.ones(R, dtype=torch.bool)

    def q(*shape, keep=None):  # e4m3 over its whole range
        x = (torch.randn(*shape, generator=g) * 100).clamp(-448, 448)
        return (x if keep is None else x * keep).to(FP8)

    def s(*shape):
        return torch.rand(*shape, generator=g) + 0.5

    def n128(n):
        return -(-n // 128)

    return SimpleNamespace(
        sizes=sizes, starts=starts, offs=offs, N=N, K=K, R=R,
        a_q=q(R, K, keep=keep_R[:, None]), a_s=s(R, n128(K)), b_q=q(len(sizes), N, K),
        b_s=s(len(sizes), n128(N), n128(K)),  # fprop: A (R, K) 1×128 along K, B (E, N, K) 128×128
        g_q=q(N, R, keep=keep_R), g_s=s(N, n128(R)), x_q=q(K, R, keep=keep_R), x_s=s(K, n128(R)))  # wgrad


def fwd_args(c):
    return c.a_q, c.a_s, c.b_q, c.b_s, c.offs


def wgrad_args(c):
    return c.g_q, c.g_s, c.x_q, c.x_s, c.offs


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# (group sizes, N, K, unused tail rows, blocks): E = 5, 3, 1; ragged N and K; empty groups, 128, 256, ragged counts.
CASES = [([0, 128, 77, 256, 0], 200, 320, 40, (128, 128)),
         ([5, 0, 130], 200, 320, 0, (64, 64)),
         ([300], 96, 128, 100, (128, 32))]


def check_fwd_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for sizes, N, K, tail, (bm, bn) in CASES:
        c = make_case(sizes, N, K, tail)
        assert use_triton(c.a_q)
        live = slice(0, int(c.offs[-1]))  # rows past offs[-1] are undefined
        ref = grouped_fp8_mm_reference(*fwd_args(c), **F64)[live]
        ours = grouped_fp8_mm(*fwd_args(c), torch.float32, block_m=bm, block_n=bn)
        assert ours.shape == (c.R, N) and ours.dtype == torch.float32
        err = rel_err(ours[live], ref)
        assert err <= 1e-6, (sizes, N, K, bm, bn, err)
    err = rel_err(grouped_fp8_mm(*fwd_args(c))[live], ref)  # default bf16 output
    assert err <= 1e-2, err
    with FakeTensorMode() as mode:  # the custom op's fake: what torch.compile sees
        out = grouped_fp8_mm(*[mode.from_tensor(t) for t in fwd_args(c)])
    assert out.shape == (c.R, c.N) and out.dtype == torch.bfloat16


def check_wgrad_kernel():
    for sizes, N, K, tail, (bn, bk) in CASES:
        c = make_case(sizes, N, K, tail, seed=1)
        assert use_triton(c.g_q)
        ref = grouped_fp8_mm_wgrad_reference(*wgrad_args(c), **F64)
        ours = grouped_fp8_mm_wgrad(*wgrad_args(c), block_n=bn, block_k=bk)
        assert ours.shape == (len(sizes), N, K) and ours.dtype == torch.float32
        err = rel_err(ours, ref)
        assert err <= 1e-6, (sizes, N, K, bn, bk, err)
        for e, n in enumerate(sizes):
            assert n or not ours[e].any()  # empty groups give zeros


def _run_interpreted(check: str):
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_fp8_grouped as t; t.{check}()"
    run_fresh(code + "; print('ok')", timeout=300)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is a dev dependency")


@needs_triton
def test_grouped_fp8_mm_triton_kernel_matches_torch_reference():
    _run_interpreted("check_fwd_kernel")


@needs_triton
def test_grouped_fp8_mm_wgrad_triton_kernel_matches_torch_reference():
    _run_interpreted("check_wgrad_kernel")


def _dequant_full(q, s, blocks):
    """Each scale repeated over its block along every dim in `blocks`, cut to q's shape, times q (float64)."""
    s = s.double()
    for dim in blocks:
        s = s.repeat_interleave(128, dim).narrow(dim, 0, q.shape[dim])
    return q.double() * s


@pytest.mark.parametrize("sizes", [[0, 128, 77, 256, 0], [5, 0, 130], [300]])
def test_fp8_grouped_references_match_float64_dequantize_einsum(sizes):
    c = make_case(sizes, N=200, K=320, tail=40, seed=2, zero_pad=True)
    A = _dequant_full(c.a_q, c.a_s, [1])  # (R, K)
    W = _dequant_full(c.b_q, c.b_s, [1, 2])  # (E, N, K)
    G, X = _dequant_full(c.g_q, c.g_s, [1]), _dequant_full(c.x_q, c.x_s, [1])  # (N, R), (K, R)
    out = grouped_fp8_mm_reference(*fwd_args(c), **F64)
    out32 = grouped_fp8_mm_reference(*fwd_args(c), out_dtype=torch.float32)
    wgrad = grouped_fp8_mm_wgrad_reference(*wgrad_args(c), **F64)
    for e, (s, n) in enumerate(zip(c.starts, sizes)):
        rows = slice(s, s + n)  # the group's real rows; its zero padding adds nothing to wgrad
        want = torch.einsum("rk,nk->rn", A[rows], W[e])
        assert torch.allclose(out[rows], want, rtol=1e-12, atol=1e-6)
        assert n == 0 or rel_err(out32[rows], want) <= 1e-6
        want = torch.einsum("nr,kr->nk", G[:, rows], X[:, rows])
        assert torch.allclose(wgrad[e], want, rtol=1e-12, atol=1e-6)


def test_cpu_without_interpreter_runs_the_references(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = make_case([77, 0, 256], N=200, K=320, tail=8)
    assert not use_triton(c.a_q)
    out = grouped_fp8_mm(*fwd_args(c))
    assert out.dtype == torch.bfloat16 and torch.equal(out, grouped_fp8_mm_reference(*fwd_args(c)))
    wgrad = grouped_fp8_mm_wgrad(*wgrad_args(c))
    assert wgrad.dtype == torch.float32 and torch.equal(wgrad, grouped_fp8_mm_wgrad_reference(*wgrad_args(c)))


@pytest.mark.parametrize("sizes", [[0, 128, 77, 256, 0], [300]])
def test_per_expert_gemms_match_float64_dequantize_einsum(sizes):
    # The per-expert path (one fp8_mm per group: cuBLAS's block-scaled GEMM on Hopper, its exact emulation here),
    # which large groups take on a GPU (CUBLAS_ROWS); backend="cublas" picks it anywhere.
    c = make_case(sizes, N=256, K=384, tail=40, seed=3, zero_pad=True)
    A, W = _dequant_full(c.a_q, c.a_s, [1]), _dequant_full(c.b_q, c.b_s, [1, 2])
    G, X = _dequant_full(c.g_q, c.g_s, [1]), _dequant_full(c.x_q, c.x_s, [1])
    out = grouped_fp8_mm(*fwd_args(c), torch.float32, backend="cublas")
    wgrad = grouped_fp8_mm_wgrad(*wgrad_args(c), backend="cublas")
    for e, (s, n) in enumerate(zip(c.starts, sizes)):
        rows = slice(s, s + n)
        assert n == 0 or rel_err(out[rows], torch.einsum("rk,nk->rn", A[rows], W[e])) <= 1e-6
        want = torch.einsum("nr,kr->nk", G[:, rows], X[:, rows])
        assert torch.equal(wgrad[e], torch.zeros_like(wgrad[e])) if n == 0 else rel_err(wgrad[e], want) <= 1e-6
