"""Model behaviour beyond the transformers parity: MTP, the paged-latent-cache path, document packing, the
balance loss's autograd entry, grouped GEMM."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

from conftest import random_model, rel_err, small_v3
from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.kernels.grouped_mm import grouped_mm, grouped_mm_reference
from dsv3.infer.paged_kv import PagedKV
from dsv3.infer.transform import prepare_for_engine
from dsv3.model.moe import MoE, sequence_balance_loss


def _rms(x, w, eps=1e-6):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_mtp_matches_hand_evaluation(tiny_cfg):
    """docs/architecture.md#multi-token-prediction:
    logits_k = head(norm(TRM([enorm(Emb(t_{i+1})) ; hnorm(h_i)] · eh_projᵀ))), with TRM evaluated by transformers'
    own decoder layer loaded with the MTP block's weights."""
    m = random_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(ids, mtp=True)
    mtp = m.mtp[0]
    T = ids.shape[1] - 1
    emb = m.embed_tokens.weight[ids[:, 1:]]
    h_prev = out.hidden[:, :T]  # the main model's final-normed hidden state (verified against transformers)
    x = torch.cat((_rms(emb, mtp.enorm.weight), _rms(h_prev, mtp.hnorm.weight)), -1) @ mtp.eh_proj.weight.T
    hf_cfg = DeepseekV3Config(**small_v3())
    hf_cfg._attn_implementation = "eager"
    block = DeepseekV3DecoderLayer(hf_cfg, layer_idx=hf_cfg.first_k_dense_replace).eval()
    block_sd = {k[len("mtp.0."):]: v for k, v in m.state_dict().items() if k.startswith("mtp.0.")}
    missing, unexpected = block.load_state_dict(block_sd, strict=False)
    assert not missing and set(unexpected) == {"enorm.weight", "hnorm.weight", "eh_proj.weight",
                                               "shared_head.norm.weight"}
    pos = torch.arange(T)[None]
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = block(x, attention_mask=causal, position_ids=pos, position_embeddings=(cos, sin))
        y = y[0] if isinstance(y, tuple) else y
    ref = _rms(y, mtp.shared_head.norm.weight) @ m.lm_head.weight.T
    assert out.mtp_logits[0].shape == (2, T, tiny_cfg.vocab_size)
    assert rel_err(out.mtp_logits[0], ref) <= 1e-5


def test_mtp_depth_two_chains_hidden_states(tiny_cfg):
    cfg = tiny_cfg.replace(num_nextn_predict_layers=2)
    m = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        out = m(ids, mtp=True)
        h1, _ = m.mtp[0](out.hidden[:, :9], m.embed_tokens(ids[:, 1:]), *_cos_sin(m, 9))
        h2, _ = m.mtp[1](h1[:, :8], m.embed_tokens(ids[:, 2:]), *_cos_sin(m, 8))
    assert [t.shape[1] for t in out.mtp_logits] == [9, 8]
    assert torch.allclose(out.mtp_logits[1], m.lm_head(m.mtp[1].shared_head.norm(h2)), atol=1e-6)


def _cos_sin(m, n):
    from dsv3.model.rope import cos_sin
    return cos_sin(torch.arange(n)[None], m.rope_inv_freq, m.rope_factor)


def test_paged_cache_decode_matches_full_forward(tiny_cfg):
    """Chunked prefill + decode of two interleaved sequences through the absorbed paged path equals a full
    recomputation (float32), every step."""
    m = prepare_for_engine(random_model(tiny_cfg))
    bs, n_blocks = 4, 16
    width = tiny_cfg.kv_lora_rank + tiny_cfg.qk_rope_head_dim
    pools = [torch.zeros(n_blocks, bs, width) for _ in range(tiny_cfg.num_hidden_layers)]
    tables = torch.tensor([[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]])
    seqs = [torch.randint(0, tiny_cfg.vocab_size, (18,)), torch.randint(0, tiny_cfg.vocab_size, (13,))]
    # (new tokens of seq 0, new tokens of seq 1) per engine step: prefill chunks, then mixed decode.
    steps = [(7, 0), (3, 5), (1, 4), (1, 1), (1, 1), (2, 1), (1, 1), (1, 0), (1, 0)]
    done = [0, 0]
    for q0, q1 in steps:
        rows, pos, slots, qlens, seq_ids = [], [], [], [], []
        for s, q in enumerate((q0, q1)):
            if q == 0:
                continue
            p = torch.arange(done[s], done[s] + q)
            rows.append(seqs[s][p]), pos.append(p), qlens.append(q), seq_ids.append(s)
            slots.append(tables[s][p // bs] * bs + p % bs)
            done[s] += q
        cache = PagedKV(pools, torch.cat(slots), tables[seq_ids], [done[s] for s in seq_ids], qlens)
        with torch.no_grad():
            logits = m(torch.cat(rows), positions=torch.cat(pos), cache=cache).logits
            start = 0
            for s, q in zip(seq_ids, qlens):
                ref = m(seqs[s][None, : done[s]]).logits[0, -q:]
                assert rel_err(logits[start:start + q], ref) <= 1e-5, (s, done[s])
                start += q


def test_mla_absorbed_matches_naive(tiny_cfg):
    """The two forms of MLA side by side in dsv3/model/mla.py: W_UK folded into the query and W_UV applied after
    attention over the latents (absorbed) against per-head K / V up-projected from them (naive, which the
    transformers parity tests check), causal and under a packed-document mask (float64)."""
    from dsv3.model.transformer import document_positions_and_mask
    m = random_model(tiny_cfg).double()
    attn = m.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 11, tiny_cfg.hidden_size, generator=g, dtype=torch.float64)
    positions, packed = document_positions_and_mask(torch.tensor([[0] * 11, [0] * 4 + [1] * 7]))
    cos, sin = _cos_sin(m, 11)
    with torch.no_grad():
        q_nope, q_pe, c_kv, k_pe = attn._project(x, cos.double().expand(2, -1, -1), sin.double().expand(2, -1, -1))
        for mask in (None, packed):
            naive = attn._expanded(q_nope, q_pe, c_kv, k_pe, mask)
            absorbed = attn._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
            assert naive.shape == absorbed.shape == (2, 11, tiny_cfg.num_attention_heads, tiny_cfg.v_head_dim)
            assert rel_err(absorbed, naive) <= 1e-12, mask is None


def test_packed_documents_do_not_attend_across(tiny_cfg):
    m = random_model(tiny_cfg)
    a, b = torch.randint(0, tiny_cfg.vocab_size, (1, 8)), torch.randint(0, tiny_cfg.vocab_size, (1, 12))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed = m(torch.cat((a, b), 1), doc_ids=doc_ids).logits
        assert rel_err(packed[:, :8], m(a).logits) <= 1e-5
        assert rel_err(packed[:, 8:], m(b).logits) <= 1e-5  # positions restart at 0 in document b


def test_balance_loss_formula_on_hand_computed_case():
    # 1 sequence, T=2 tokens, E=4 experts, K=2. Token 0 picks {0,1}, token 1 picks {0,2}.
    s = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]]])
    idx = torch.tensor([[[0, 1], [0, 2]]])
    f = torch.tensor([2, 1, 1, 0]) * 4 / (2 * 2)  # N_r/(K_r·T) · hits
    P = torch.tensor([(0.4 + 0.5) / 2, (0.3 + 0.1) / 2, (0.2 + 0.3) / 2, (0.1 + 0.1) / 2])  # rows sum to 1
    assert math.isclose(sequence_balance_loss(s, idx).item(), (f * P).sum().item(), rel_tol=1e-6)


def test_balance_loss_enters_gradient_inside_moe(tiny_cfg):
    torch.manual_seed(0)
    moe = MoE(tiny_cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 6, tiny_cfg.hidden_size)
    alpha = 0.3
    moe.balance_coef = alpha
    moe(x)[0].square().sum().backward()
    with_loss = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.balance_coef = 0.0
    _, idx, scores = moe.gate(x.reshape(-1, x.shape[-1]))
    explicit = moe(x)[0].square().sum() + alpha * sequence_balance_loss(scores.view(2, 6, -1), idx.view(2, 6, -1))
    explicit.backward()
    assert torch.allclose(with_loss, moe.gate.weight.grad, atol=1e-6)
    assert not torch.allclose(with_loss, torch.zeros_like(with_loss))


def test_router_stats_count_every_routed_token(tiny_cfg):
    m = random_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (3, 10))
    out = m(ids, mtp=True)
    n_moe = tiny_cfg.n_moe_layers + tiny_cfg.num_nextn_predict_layers
    assert out.expert_counts.shape == (n_moe, tiny_cfg.n_routed_experts)
    main, mtp = out.expert_counts[:-1], out.expert_counts[-1]
    assert (main.sum(-1) == 30 * tiny_cfg.num_experts_per_tok).all()
    assert mtp.sum() == 27 * tiny_cfg.num_experts_per_tok


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype, fused, monkeypatch):
    import dsv3.kernels.cross_entropy as ce
    monkeypatch.setattr(ce, "_chunks", lambda n, v: (slice(s, s + 7) for s in range(0, n, 7)))  # ragged chunks
    if fused:  # the GPU path's math (compiled there), run eagerly here
        monkeypatch.setattr(ce, "_fused", lambda logits: True)
        monkeypatch.setattr(ce, "_compiled", lambda: (ce._logsumexp, ce._grad))
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(30, 50, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(50, (30,), generator=g)
    labels[::4] = -100  # ignored rows: no loss, no gradient
    weight = torch.rand(30, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    ours, ref = logits.clone().requires_grad_(), logits.double().requires_grad_()
    nll = cross_entropy(ours, labels)
    ref_nll = F.cross_entropy(ref, labels, reduction="none")
    (nll.double() * weight).sum().backward()
    (ref_nll * weight).sum().backward()
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(nll.double(), ref_nll, atol=tol) and (nll[::4] == 0).all()
    assert ours.grad.dtype == dtype and torch.allclose(ours.grad.double(), ref.grad, atol=tol)
    with pytest.raises(ValueError, match="logits \\(N, V\\) and labels \\(N,\\)"):
        cross_entropy(logits, labels[:5])


def test_grouped_mm_matches_per_group_matmul():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 16, generator=g), torch.randn(5, 16, 24, generator=g)
    offs = torch.tensor([4, 4, 20, 31, 37], dtype=torch.int32)  # includes an empty group
    ref = torch.cat([x[:4] @ w[0], x[4:20] @ w[2], x[20:31] @ w[3], x[31:] @ w[4]])
    assert torch.allclose(grouped_mm(x, w, offs), ref, atol=1e-5)
    assert torch.allclose(grouped_mm_reference(x.double(), w.double(), offs), ref.double(), atol=1e-5)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm(xg, wg, offs)
    y.backward(torch.ones_like(y))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    grouped_mm_reference(xr, wr, offs).backward(torch.ones_like(y))
    assert torch.allclose(xg.grad, xr.grad, atol=1e-5) and torch.allclose(wg.grad, wr.grad, atol=1e-4)
    # No rows at all (an expert-parallel rank that received none): an empty output that autograd still reaches.
    x0 = torch.randn(0, 16, requires_grad=True)
    y0 = grouped_mm(x0, wg, torch.zeros(5, dtype=torch.int32))
    assert y0.shape == (0, 24) and y0.grad_fn is not None
    assert torch.equal(torch.autograd.grad(y0.sum(), wg)[0], torch.zeros_like(wg))


def test_training_step_reduces_loss(tiny_cfg):
    m = random_model(tiny_cfg).train()
    ids = torch.randint(0, tiny_cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = m(ids, mtp=True)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + 0.3 * F.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), ids[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_bf16_cast_keeps_fp32_buffers(tiny_cfg):
    m = random_model(tiny_cfg)
    bias = m.layers[1].mlp.gate.e_score_correction_bias
    bias.fill_(1e-3 + 1e-6)  # not representable in bf16
    freq = m.rope_inv_freq.clone()
    m = m.to(torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert m.layers[1].mlp.gate.e_score_correction_bias[0].item() == torch.tensor(1e-3 + 1e-6).item()
    assert torch.equal(m.rope_inv_freq, freq)


def test_group_score_equals_topk_two_sum_with_ties():
    from dsv3.model.moe import _top2_sum
    x = torch.randn(200, 8, 32, generator=torch.Generator().manual_seed(0))
    x[0, 0, :3] = 5.0  # a tie at the top counts twice, as with topk
    x[1, 1, :] = 0.25
    assert torch.equal(_top2_sum(x), x.topk(2, dim=-1).values.sum(-1))


def test_group_rank_selects_what_topk_selects():
    from dsv3.model.moe import _rank
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    x[:50, 5] = x[:50, 2]  # ties: each still gets its own rank
    r = _rank(x)
    assert torch.equal(r.sort(-1).values, torch.arange(8).expand(500, 8))
    top4 = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.topk(4, dim=-1).indices, True)
    assert torch.equal((r < 4)[50:], top4[50:])
    assert ((r < 4).sum(-1) == 4).all()


def test_experts_counting_sort_and_argsort_paths_agree(tiny_cfg, monkeypatch):
    # Decode-sized batches order rows by a counting sort, large ones by a stable argsort: the same permutation.
    moe = random_model(tiny_cfg).layers[1].mlp
    x = torch.randn(300, tiny_cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        monkeypatch.setattr("dsv3.kernels.moe.COUNTING_SORT_MAX", 0)
        by_argsort, counts = moe.experts(x, w, idx)
        monkeypatch.setattr("dsv3.kernels.moe.COUNTING_SORT_MAX", 1 << 30)
        by_counting, counts2 = moe.experts(x, w, idx)
    assert torch.equal(by_counting, by_argsort) and torch.equal(counts, counts2)
    assert counts.sum() == 300 * tiny_cfg.num_experts_per_tok


def test_mla_decode_reference_in_length_buckets_equals_one_padded_batch():
    from dsv3.kernels.mla_decode import mla_decode_reference
    g = torch.Generator().manual_seed(0)
    B, H, C, R, bs = 21, 3, 16, 8, 4
    lens = torch.randint(1, 30, (B,), generator=g)
    kv = torch.randn(200, bs, C + R, generator=g, dtype=torch.float64)
    tables = torch.randperm(200, generator=g)[: B * 8].view(B, 8)
    q_c = torch.randn(B, H, C, generator=g, dtype=torch.float64)
    q_pe = torch.randn(B, H, R, generator=g, dtype=torch.float64)
    bucketed = mla_decode_reference(q_c, q_pe, kv, tables, lens, 0.2, buckets=4)
    one = mla_decode_reference(q_c, q_pe, kv, tables, lens, 0.2, buckets=1)
    # and each row against a direct softmax over exactly its own S_b cached rows
    for b in [0, 7, 20]:
        lat = kv[tables[b]].flatten(0, 1)[: lens[b]]
        p = torch.softmax((lat @ torch.cat((q_c[b], q_pe[b]), -1).T).T * 0.2, -1)
        assert torch.allclose(bucketed[b], p @ lat[:, :C], atol=1e-12)
    assert torch.allclose(bucketed, one, atol=1e-12)


def test_fused_projections_keep_outputs_names_training_and_checkpoints(tiny_cfg, tmp_path):
    """prepare_for_engine (what the engine runs on) changes no output, no parameter name; training still reaches
    every layer and the fused matrices see its updates; a checkpoint of the fused model saves and loads back."""
    import dsv3
    m = random_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(ids).logits
    names = list(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)  # built first, as GRPO's is before its engine fuses the model
    prepare_for_engine(m)
    assert {id(p) for p in m.parameters()} == {id(p) for p in opt.param_groups[0]["params"]}
    attn = m.layers[0].self_attn
    assert attn.fused_a is not None and attn.fused_a.data_ptr() == attn.q_a_proj.weight.data_ptr()
    with torch.no_grad():
        assert rel_err(m(ids).logits, before) < 1e-6
    assert list(m.state_dict()) == names and prepare_for_engine(m) is m  # idempotent
    assert attn.fused_a.data_ptr() == attn.q_a_proj.weight.data_ptr()
    m(ids).logits.square().mean().backward()
    assert attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0 and m.layers[0].mlp.up_proj.weight.grad is not None
    opt.step()
    with torch.no_grad():
        fused = m(ids).logits  # through the fused matrices
        attn_rows = attn.fused_a[attn.q_a_proj.out_features:]
        assert torch.equal(attn_rows, attn.kv_a_proj_with_mqa.weight)
        unfused = [(mod, name, getattr(mod, name)) for mod in m.modules() for name in ("fused_a", "gate_up")
                   if getattr(mod, name, None) is not None]
        for mod, name, _ in unfused:
            setattr(mod, name, None)
        plain = m(ids).logits
        for mod, name, t in unfused:
            setattr(mod, name, t)
    assert rel_err(fused, plain) < 1e-6 and rel_err(fused, before) > 1e-3
    dsv3.save_model(m, tmp_path / "ckpt")
    back = dsv3.load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert rel_err(back(ids).logits, plain) < 1e-6
