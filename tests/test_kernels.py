"""Triton kernels against their torch references, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must
be set before triton is imported, so each check runs in a fresh interpreter). The interpreter computes through
numpy, which has no bfloat16: fp16 stands in for the 16-bit case here; bf16 runs on the GPU."""
import textwrap

import pytest
from conftest import run_fresh

pytest.importorskip("triton", reason="triton is a dev dependency on Linux")

MLA_DECODE = textwrap.dedent("""
    import torch
    from dsv3.kernels import use_triton
    from dsv3.kernels.mla_decode import mla_decode, mla_decode_reference
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
        assert use_triton(q_c)
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
    run_fresh(MLA_DECODE)


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
    # FP8 weights (e4m3, 128x128 block scales per expert; D and F off the blocks), rows unsorted and sorted,
    # against float64 on the dequantized weights
    from dsv3.fp8.format import dequantize_blocks
    from dsv3.fp8.quantize import quantize_blocks
    E, D, F_, K = 4, 200, 136, 2
    (q1, s1), (q2, s2) = quantize_blocks(torch.randn(E, 2 * F_, D, generator=g) / D ** 0.5), \
        quantize_blocks(torch.randn(E, D, F_, generator=g) / F_ ** 0.5)
    w1, w2 = dequantize_blocks(q1, s1, torch.float64), dequantize_blocks(q2, s2, torch.float64)
    for N in (1, 20):
        x = torch.randn(N, D, generator=g)
        rows = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).flatten()
        w = torch.rand(N * K, generator=g)
        each = torch.stack([F.linear(F.silu(gate) * up, w2[e]) * wr for e, wr, gate, up in
                            [(e, wr, *F.linear(x[p // K].double(), w1[e]).chunk(2))
                             for p, (e, wr) in enumerate(zip(rows.tolist(), w.double()))]])
        if N == 1:
            ours = moe_decode.moe_ffn(x, q1, q2, rows, w, K, scales=(s1, s2))
        else:
            order = rows.argsort(stable=True)
            ours = torch.empty_like(x.new_empty(N * K, D))
            ours[order] = moe_decode.moe_ffn(x, q1, q2, order, w[order], K, torch.bincount(rows, minlength=E).cumsum(0),
                                             scales=(s1, s2))
        err = ((ours.double() - each).norm() / each.norm()).item()
        assert err < 1e-5, ("fp8 weights", N, err)
    print("ok")
""")


def test_moe_decode_triton_kernels_match_per_expert_reference():
    run_fresh(MOE_DECODE)


# Every launch of our Triton kernels at the settings the code uses, compiled (not run) for an H100 by Triton's own
# compiler on this CPU: the interpreter above never compiles, and a kernel that only fails to compile (types that
# differ between branches, a tile too large for shared memory) would otherwise first fail on a GPU machine.
HOPPER = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    launches = []
    JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw))  # record only
    from dsv3.fp8 import gemm, grouped as fp8_grouped, quantize
    from dsv3.fp8.format import FP8
    from dsv3.kernels import mla_decode, moe_decode
    bf, f8 = torch.bfloat16, FP8
    x = torch.randn(300, 520).to(bf)
    for ue8m0 in (False, True):
        quantize._quantize_rows_launch(x, ue8m0, True)
        quantize._quantize_blocks_launch(x.view(2, 150, 520), ue8m0, True)
    E, N, K, R = 4, 256, 384, 512
    offs = torch.tensor([128, 256, 256, 512], dtype=torch.int32)
    fp8_grouped._grouped_fp8_mm_triton(torch.zeros(R, K).to(f8), torch.ones(R, K // 128), torch.zeros(E, N, K).to(f8),
                                       torch.ones(E, N // 128, K // 128), offs, bf, 128, 128, 8, 3)
    fp8_grouped._grouped_fp8_wgrad_triton(torch.zeros(N, R).to(f8), torch.ones(N, R // 128), torch.zeros(K, R).to(f8),
                                          torch.ones(K, R // 128), offs, torch.float32, 128, 128, 8, 3)
    for H, C, Rd in ((16, 256, 32), (128, 512, 64)):  # bench-684m's and DeepSeek-V3's latent widths
        for splits in (1, 4):
            B = 3
            mla_decode._mla_decode_triton(torch.randn(B, H, C).to(bf), torch.randn(B, H, Rd).to(bf),
                                          torch.randn(8, 64, C + Rd).to(bf), torch.zeros(B, 2, dtype=torch.int32),
                                          torch.tensor([5, 64, 100]), 0.1, 32, splits)
    E, D, F = 64, 1024, 256
    w1, w2 = torch.randn(E, 2 * F, D).to(bf), torch.randn(E, D, F).to(bf)
    for n, k, sort in ((1, 6, False), (2, 6, True), (32, 6, True)):  # unsorted, and sorted with few and many rows
        rows = torch.randint(0, E, (n * k,))
        order = rows.argsort() if sort else rows
        offs = torch.bincount(rows, minlength=E).cumsum(0) if sort else None
        moe_decode._moe_ffn(torch.randn(n, D).to(bf), w1, w2, order, torch.rand(n * k), k, offs, None, None)
        moe_decode._moe_ffn(torch.randn(n, D).to(bf), w1.to(f8), w2.to(f8), order, torch.rand(n * k), k, offs,
                            torch.ones(E, 2 * F // 128, D // 128), torch.ones(E, D // 128, F // 128))  # FP8 weights
    rows = torch.randint(0, E, (6,))  # an fp32 model's decode step (its tiles are twice bf16's bytes)
    moe_decode._moe_ffn(torch.randn(1, D), w1.float(), w2.float(), rows, torch.rand(6), 6, None, None, None)
    mla_decode._mla_decode_triton(torch.randn(3, 16, 256), torch.randn(3, 16, 32), torch.randn(8, 64, 288),
                                  torch.zeros(3, 2, dtype=torch.int32), torch.tensor([5, 64, 100]), 0.1, 32, 4)
    for waves, M, N in ((0, 1, 1536), (2, 1, 1536), (2, 1, 64), (0, 200, 1536)):  # FP8 weights at inference:
        # decode rows (unsplit, and the reduction split in 1 and in 4 slices: the interpreter's 4 SMs), prefill
        gemm.SPLIT_K_WAVES = waves
        gemm._w8_mm_op(torch.randn(M, 7168).to(bf), torch.zeros(N, 7168).to(f8), torch.ones(-(-N // 128), 56))
    TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64", f8: "fp8e4nv"}
    def type_of(v):
        if isinstance(v, torch.Tensor):
            return "*" + TYPES[v.dtype]
        if isinstance(v, float):
            return "fp32"
        return "i32" if -2**31 <= v < 2**31 else "i64"
    done = set()
    for fn, args, kw in launches:
        bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kw.items() if k in fn.arg_names}
        options = {k: v for k, v in kw.items() if k not in fn.arg_names}
        sig = {p.name: "constexpr" if p.is_constexpr else type_of(bound[p.name]) for p in fn.params}
        consts = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
        key = (fn.__name__, str(sig), str(consts), str(options))
        if key in done:
            continue
        done.add(key)
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
        assert k.metadata.shared <= 227 * 1024, (key, k.metadata.shared)  # an H100's shared memory per block
    names = {k[0] for k in done}
    assert names == {"_quant_rows_kernel", "_quant_cols_kernel", "_quant_blocks_kernel", "_grouped_fp8_fwd_kernel",
                     "_grouped_fp8_wgrad_kernel", "_mla_decode_kernel", "_mla_combine_kernel", "_gate_up_kernel",
                     "_down_kernel", "_w8_mm_kernel", "_w8_splitk_kernel"}, names
    print(len(done), "ok")
""")


def test_triton_kernels_compile_for_hopper():
    run_fresh(HOPPER, interpret=False, timeout=900)
