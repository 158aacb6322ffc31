"""Triton kernels against their torch references, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must
be set before triton is imported, so each check runs in a fresh interpreter). The interpreter computes through
numpy, which has no bfloat16: fp16 stands in for the 16-bit case here; bf16 runs on the GPU."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is a dev dependency on Linux")

MLA_DECODE = textwrap.dedent("""
    import torch
    from dsv3.kernels.mla_decode import _use_triton, mla_decode, mla_decode_reference
    g = torch.Generator().manual_seed(0)
    for H, C, R, bs, lens, dtype in [(4, 16, 8, 16, [1, 16, 37, 70], torch.float32),
                                     (20, 64, 16, 8, [5, 33], torch.float32),
                                     (16, 32, 16, 16, [50, 17, 3], torch.float16)]:
        B, n_blocks = len(lens), 24
        kv = torch.randn(n_blocks, bs, C + R, generator=g).to(dtype)
        # Each sequence owns scattered blocks of the pool, as the engine hands them out.
        perm = torch.randperm(n_blocks, generator=g)
        need = [-(-n // bs) for n in lens]
        tables = torch.zeros(B, max(need), dtype=torch.long)
        i = 0
        for b, k in enumerate(need):
            tables[b, :k] = perm[i:i + k]
            i += k
        q_c = torch.randn(B, H, C, generator=g).to(dtype)
        q_pe = torch.randn(B, H, R, generator=g).to(dtype)
        seq_lens = torch.tensor(lens)
        assert _use_triton(q_c)
        ref = mla_decode_reference(q_c.double(), q_pe.double(), kv.double(), tables, seq_lens, 0.3)
        # One program per sequence, or its tokens split over 2 / 8 programs (flash-decoding; with 8, some
        # splits of the short sequences see no token at all).
        for splits in (1, 2, 8):
            ours = mla_decode(q_c, q_pe, kv, tables, seq_lens, 0.3, block_n=16, splits=splits)
            err = ((ours.double() - ref).norm() / ref.norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (H, C, R, dtype, splits, err)
    print("ok")
""")


def test_mla_decode_triton_kernel_matches_torch_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", MLA_DECODE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


MOE_DECODE = textwrap.dedent("""
    from dataclasses import replace
    import torch
    import torch.nn.functional as F
    from dsv3.config import preset
    from dsv3.kernels import moe_decode
    from dsv3.model.moe import Experts
    g = torch.Generator().manual_seed(0)
    # Tokens x top-k rows over E experts: one row per expert, and > 16 rows per expert (several of the kernels'
    # 16-row chunks); D and F off the kernels' block sizes; some experts get no row.
    for N, K, E, used, D, F_, dtype in [(1, 2, 8, 8, 48, 40, torch.float32), (40, 2, 16, 4, 160, 24, torch.float32),
                                        (6, 3, 16, 8, 64, 32, torch.float16)]:
        ex = Experts(replace(preset("tiny"), n_routed_experts=E, n_group=1, topk_group=1,
                             num_experts_per_tok=K, hidden_size=D, moe_intermediate_size=F_))
        with torch.no_grad():
            ex.gate_up_proj.copy_(torch.randn(E, 2 * F_, D, generator=g) / D ** 0.5)
            ex.down_proj.copy_(torch.randn(E, D, F_, generator=g) / F_ ** 0.5)
        ex = ex.to(dtype)
        x = torch.randn(N, D, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(used, generator=g)[:K] for _ in range(N)])
        w = torch.rand(N, K, generator=g)
        # Independent reference: each token's experts one by one, in float64.
        ref = torch.zeros(N, D, dtype=torch.float64)
        for n in range(N):
            for k in range(K):
                wgu, wd = ex.gate_up_proj[idx[n, k]].double(), ex.down_proj[idx[n, k]].double()
                gate, up = (wgu @ x[n].double()).chunk(2)
                ref[n] += w[n, k] * (wd @ (F.silu(gate) * up))
        with torch.no_grad():
            assert moe_decode.usable(x, N * K, E)
            ours, counts = ex(x, w, idx)
        err = ((ours.double() - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (N, K, E, dtype, err)
        assert counts.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
        # Up to 16 rows the kernels also take them unsorted (as Experts does for one token): experts of several rows
        rows = torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(N)]).flatten()[:16]
        w = torch.rand(rows.numel(), generator=g)
        each = torch.stack([F.linear(F.silu(gate) * up, ex.down_proj[e].double()) * wr for e, wr, gate, up in
                            [(e, wr, *F.linear(x[p // K].double(), ex.gate_up_proj[e].double()).chunk(2))
                             for p, (e, wr) in enumerate(zip(rows.tolist(), w.double()))]])
        with torch.no_grad():
            ours = moe_decode.moe_ffn(x, ex.gate_up_proj, ex.down_proj, rows, w, K)
        err = ((ours.double() - each).norm() / each.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), ("unsorted", N, K, E, dtype, err)
    print("ok")
""")


def test_moe_decode_triton_kernels_match_per_expert_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", MOE_DECODE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
