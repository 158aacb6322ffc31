"""FP8 training (docs/fp8.md#training-recipe) on the CPU: quantization error bounds, the three GEMMs of an FP8
linear and of the FP8 experts against float64 references, the Triton quantize kernels in Triton's interpreter,
and apply_fp8 on a model that then trains."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import run_fresh

from dsv3.config import preset
from dsv3.fp8.format import FP8, dequantize_blocks
from dsv3.fp8.quantize import dequantize_rows, quantize_blocks, quantize_rows, quantize_rows_reference
from dsv3.model import Transformer
from dsv3.model.moe import Experts
from dsv3.fp8.training import Fp8Experts, Fp8Linear, apply_fp8

# E4M3: 3 mantissa bits, so rounding to nearest errs by at most 2^-4 of |x| for normal values; below the smallest
# normal (2^-6) the spacing is 2^-9, so the absolute error is at most 2^-10 (in units of the scale).
REL, ABS = 2.0 ** -4, 2.0 ** -10


def tiles_reference(x64: torch.Tensor, ue8m0: bool):
    """Per 1×128 tile along the last dim, written as a loop: scale = max(amax, 1e-4) / 448 (rounded up to a power
    of two with ue8m0) and the fp8 value of x / scale."""
    M, K = x64.shape
    s = torch.empty(M, -(-K // 128), dtype=torch.float64)
    for m in range(M):
        for j in range(s.shape[1]):
            v = max(x64[m, 128 * j:128 * (j + 1)].abs().max().item(), 1e-4) / 448
            s[m, j] = 2.0 ** torch.tensor(v).log2().ceil().item() if ue8m0 else v
    return s


def check_bounds(x, deq, s_full):
    err = (deq.double() - x.double()).abs()
    bound = torch.maximum(x.double().abs() * REL, s_full.double() * ABS) * (1 + 1e-6)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("kind", ["normal", "outliers", "tiny"])
def test_row_quantization_scales_and_error_bound(kind, ue8m0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 300, generator=g)  # ragged: 300 = 2 tiles + 44
    if kind == "outliers":  # one huge value per tile pushes the rest of its tile towards subnormals
        x[:, ::128] *= 1e4
    if kind == "tiny":  # amax below the 1e-4 clamp
        x *= 1e-7
    q, s = quantize_rows(x, ue8m0)
    assert q.dtype == FP8 and s.shape == (37, 3)
    s_ref = tiles_reference(x.double(), ue8m0)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-6, atol=0)
    if ue8m0:
        assert torch.equal(s.log2(), s.log2().round())
    s_full = s.repeat_interleave(128, 1)[:, :300]
    check_bounds(x, dequantize_rows(q, s), s_full)
    assert (q.float().abs() <= 448).all()


def test_transposed_quantization_tiles_run_down_the_tokens():
    x = torch.randn(300, 200)
    x[5, :] *= 1000  # an outlier token: only the column tiles of rows 0..127 see it
    q, s, qt, st = quantize_rows(x, both=True)
    assert qt.shape == (200, 300) and st.shape == (200, 3)
    torch.testing.assert_close(st.double(), tiles_reference(x.t().double(), False), rtol=1e-6, atol=0)
    check_bounds(x.t(), dequantize_rows(qt, st), st.repeat_interleave(128, 1)[:, :300])


def test_block_quantization_ragged_edges():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 200, 330, generator=g) * 0.02
    w[1, 199, 329] = 5.0  # lands in the ragged corner block (rows 128..199, cols 256..329) of expert 1
    q, s = quantize_blocks(w)
    assert s.shape == (2, 2, 3)
    for e in range(2):
        for i in range(2):
            for j in range(3):
                blk = w[e, 128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
                assert s[e, i, j].item() == pytest.approx(blk.abs().max().item() / 448, rel=1e-6)
    full = s.repeat_interleave(128, -2)[:, :200].repeat_interleave(128, -1)[..., :330]
    check_bounds(w, dequantize_blocks(q, s), full)
    assert s[1, 1, 2] > 5.0 / 448 * 0.999 and s[0, 1, 2] < 1e-3  # the outlier only coarsens its own block


def quantized_linear_reference(x, w, dy):
    """Float64 y, dx, dW of the FP8 recipe, from operands quantized here along the axes the recipe names."""
    def deq_rows(t):
        q, s = quantize_rows_reference(t)
        return dequantize_rows(q, s, torch.float64)
    wq, ws = quantize_blocks(w)
    w64 = dequantize_blocks(wq, ws, torch.float64)
    y = deq_rows(x) @ w64.t()
    dx = deq_rows(dy) @ w64
    dw = deq_rows(dy.t()) @ deq_rows(x.t()).t()
    return y, dx, dw


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("M,K,N", [(256, 384, 256), (130, 200, 72)])
def test_fp8_linear_fprop_dgrad_wgrad(M, K, N):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g)
    dy = torch.randn(M, N, generator=g)
    lin = torch.nn.Linear(K, N, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    lin.__class__ = Fp8Linear
    xr = x.clone().requires_grad_()
    y = lin(xr)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = quantized_linear_reference(x, lin.weight.detach(), dy)
    # The same quantized operands in float64: only fp32 accumulation order differs.
    assert rel(y, y_ref) < 1e-6 and rel(xr.grad, dx_ref) < 1e-6 and rel(lin.weight.grad, dw_ref) < 1e-6
    # Against the unquantized float64 linear: the documented FP8 error (measured ~3.7% for one W8A8 GEMM).
    w64, x64, dy64 = lin.weight.detach().double(), x.double(), dy.double()
    assert rel(y, x64 @ w64.t()) < 0.06
    assert rel(xr.grad, dy64 @ w64) < 0.06
    assert rel(lin.weight.grad, dy64.t() @ x64) < 0.06


def test_fp8_linear_under_autocast_returns_bf16_and_fp32_weight_grads():
    lin = torch.nn.Linear(256, 128, bias=False)
    lin.__class__ = Fp8Linear
    x = torch.randn(4, 32, 256, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 32, 128)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.shape == x.shape


def test_fp8_experts_match_bf16_experts_within_fp8_error():
    cfg = preset("tiny").replace(hidden_size=256, moe_intermediate_size=128, n_routed_experts=5,
                                 n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(4)
    ref = Experts(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=g)
    fp8 = Experts(cfg)
    fp8.load_state_dict(ref.state_dict())
    fp8.__class__ = Fp8Experts
    N, K = 150, 2
    x = torch.randn(N, 256, generator=g)
    idx = torch.stack([torch.randperm(5, generator=g)[:K] for _ in range(N)])
    idx[:40] = torch.tensor([0, 3])  # uneven loads; expert 4 may get few rows
    w = torch.rand(N, K, generator=g)
    outs = []
    for m in (ref, fp8):
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        y, counts = m(xr, wr, idx)
        (y * torch.linspace(-1, 1, 256)).sum().backward()
        outs.append((y, xr.grad, wr.grad, m.gate_up_proj.grad, m.down_proj.grad, counts))
    for a, b in zip(outs[1][:5], outs[0][:5]):
        assert rel(a, b) < 0.08
    assert torch.equal(outs[0][5], outs[1][5])


def test_apply_fp8_converts_decoder_gemms_only_and_trains():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.02)
    keys = list(model.state_dict())
    counts = apply_fp8(model, min_dim=0)
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is torch.nn.Linear and type(model.mtp[0].eh_proj) is torch.nn.Linear
    assert counts["linears"] > 0 and counts["experts"] == sum(1 for m in model.modules() if isinstance(m, Experts))
    assert all(type(m) is not torch.nn.Linear for n, m in model.layers.named_modules() if "gate" != n[-4:])
    ids = torch.randint(cfg.vocab_size, (2, 65))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert losses[-1] < losses[0] - 0.5


QUANT_KERNEL = textwrap.dedent("""
    import torch
    from dsv3.fp8 import quantize as fp8
    g = torch.Generator().manual_seed(0)
    for M, K, ue8m0 in [(300, 200, False), (128, 256, True), (7, 130, False)]:
        x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)
        x[0, 3] = 1e4
        for both in (False, True):
            out = fp8._quantize_rows_launch(x, ue8m0, both)  # fp32 values before the cast under the interpreter
            y, s = fp8.quantize_rows_reference(x, ue8m0, cast=False)
            assert torch.equal(out[0], y) and torch.equal(out[1].t(), s), (M, K, ue8m0)
            if both:
                yt, st = fp8.quantize_rows_reference(x.t(), ue8m0, cast=False)
                assert torch.equal(out[2], yt) and torch.equal(out[3].t(), st), (M, K, ue8m0)
        q = fp8.quantize_rows(x, ue8m0, both=True)
        for got, want in zip(q, (*fp8.quantize_rows_reference(x, ue8m0), *fp8.quantize_rows_reference(x.t(), ue8m0))):
            assert got.dtype == want.dtype and torch.equal(got.float(), want.float())
        w = torch.randn(2, M, K, generator=g) * 0.02
        w[1, -1, -1] = 3.0
        for w in (w, w.bfloat16()):  # fp32 master weights (qᵀ by torch) and bf16 ones (qᵀ stored by the kernel)
            q, s, qt = fp8.quantize_blocks(w, ue8m0, transposed=True)
            q_ref, s_ref = fp8.quantize_blocks_reference(w, ue8m0)
            assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref), (M, K, ue8m0, w.dtype)
            assert torch.equal(qt.float(), q_ref.transpose(1, 2).float())
    print("ok")
""")


def test_triton_quantize_kernel_matches_torch_reference():
    pytest.importorskip("triton")
    run_fresh(QUANT_KERNEL)


# FP8 weights at inference (dsv3/fp8/inference.py): the weight-only GEMM's Triton kernels against float64 on
# the dequantized weight, ragged N and K (a 576-row kv_a-like weight, K off 128), 1 to 40 rows; up to 16 rows with
# the reduction whole and split (the interpreter counts 4 SMs: 2 and 3 slices below, the last one ragged), and a
# second call on the same weight must agree with the first (the split's ticket counters are back at zero).
W8_KERNEL = textwrap.dedent("""
    import torch
    from dsv3.fp8 import gemm
    from dsv3.fp8.format import dequantize_blocks, quantize
    from dsv3.fp8.gemm import fp8_weight_mm
    from dsv3.kernels import use_triton
    g = torch.Generator().manual_seed(0)
    for waves, M, N, K, dtype in [(w, *case) for w in (0, 2) for case in [(1, 200, 300, torch.float32), (5, 576, 256, torch.float16), (16, 64, 128, torch.float32),
                           (3, 96, 1000, torch.float32), (40, 130, 384, torch.float32), (17, 256, 200, torch.float16)]]:
        gemm.SPLIT_K_WAVES = waves  # 0: the few-rows kernel that does not split; 2: the split-K one
        wq, ws = quantize(torch.randn(N, K, generator=g) * 0.1)
        x = torch.randn(M, K, generator=g).to(dtype)
        assert use_triton(x)
        ref = x.double() @ dequantize_blocks(wq, ws, torch.float64).t()
        ours = fp8_weight_mm(x, wq, ws)
        err = ((ours.double() - ref).norm() / ref.norm()).item()
        assert ours.dtype == dtype and err < (1e-6 if dtype == torch.float32 else 2e-3), (M, N, K, dtype, err)
        assert torch.equal(fp8_weight_mm(x, wq, ws), ours), (M, N, K)
    print("ok")
""")


def test_fp8_weight_mm_kernel_matches_dequantized_float64():
    pytest.importorskip("triton")
    run_fresh(W8_KERNEL)
