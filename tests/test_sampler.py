"""dsv3.infer.sampler against independent references: transformers' logits processors / warpers, hand-computed
OpenAI penalties, torch.log_softmax, and a chi-square test of the drawn tokens."""
import re

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from dsv3.infer import sampler
from dsv3.infer.sampler import SamplingParams, apply_penalties, draw_rows, process_logits, sample

# Upper 0.001 quantiles of the chi-square distribution, by degrees of freedom (standard tables).
CHI2_CRIT_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def _empty(R):
    return [[] for _ in range(R)]


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(n=0), "n=0"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(frequency_penalty=2.5), "frequency_penalty=2.5"),
    (dict(presence_penalty=-3.0), "presence_penalty=-3.0"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(min_tokens=-1), "min_tokens=-1"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens=5 must be <= max_tokens=4"),
    (dict(logprobs=21), "logprobs=21"),
    (dict(stop=[""]), "stop=['']"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids=[3, -1]"),
    (dict(logit_bias={3: 101.0}), "logit_bias={3: 101.0}"),
    (dict(temperature=float("nan")), "temperature=nan"),
])
def test_sampling_params_validation_names_field_and_value(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        SamplingParams(**kw)


def test_sampling_params_defaults_and_stop_normalisation():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.max_tokens == 16 and not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=-1, logprobs=0).top_k == -1


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    R, V = 3, 40
    logits_RV = torch.randn(R, V, generator=g) * 3
    prompt = [torch.randint(0, V, (12,), generator=g).tolist() for _ in range(R)]
    output = [torch.randint(0, V, (7,), generator=g).tolist() for _ in range(R)]
    penalties = [1.3, 0.7, 1.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    got_RV = apply_penalties(logits_RV, params, prompt, output)
    for r, pen in enumerate(penalties):
        ids = torch.tensor([prompt[r] + output[r]])
        want = RepetitionPenaltyLogitsProcessor(pen)(ids, logits_RV[r:r + 1].clone())[0]
        torch.testing.assert_close(got_RV[r], want, rtol=0, atol=0)
    assert torch.equal(got_RV[2], logits_RV[2])  # penalty 1: untouched


def test_logit_bias_matches_transformers_sequence_bias_and_moves_the_greedy_choice():
    g = torch.Generator().manual_seed(1)
    logits_RV = torch.randn(2, 30, generator=g)
    bias = {4: 5.0, 7: -100.0, 29: 0.5}
    params = [SamplingParams(logit_bias=bias, repetition_penalty=1.2), SamplingParams()]
    got_RV = apply_penalties(logits_RV, params, [[1, 2], [3]], [[5], []])
    # transformers: repetition penalty, then each single-token "sequence" bias added to its logit
    ids = torch.tensor([[1, 2, 5]])
    want = RepetitionPenaltyLogitsProcessor(1.2)(ids, logits_RV[:1].clone())
    want = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in bias.items()])(ids, want)[0]
    torch.testing.assert_close(got_RV[0], want)
    assert torch.equal(got_RV[1], logits_RV[1])  # a row without bias is untouched
    greedy = SamplingParams(temperature=0, logit_bias={int(logits_RV[0].argmin()): 100.0})
    assert sample(logits_RV[:1], [greedy], [[]], [[]], [None], None).token_ids == [int(logits_RV[0].argmin())]


def test_frequency_presence_penalty_hand_computed():
    logits_1V = torch.tensor([[1.0, 2.0, -1.0, 0.5, 0.0]])
    prompt, output = [[0, 2]], [[1, 1, 3]]  # OpenAI penalties count the output only
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    want = torch.tensor([1.0, 2 - 0.5 * 2 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 0.0])
    torch.testing.assert_close(apply_penalties(logits_1V, [p], prompt, output)[0], want)
    # With repetition_penalty=2 first (prompt AND output, vLLM order), then frequency / presence.
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    want = torch.tensor([1.0 / 2, 2.0 / 2 - 1.25, -1.0 * 2, 0.5 / 2 - 0.75, 0.0])
    torch.testing.assert_close(apply_penalties(logits_1V, [p], prompt, output)[0], want)


def _hf_warp(x_1V, p: SamplingParams):
    ids = torch.zeros(1, 1, dtype=torch.long)
    x_1V = TemperatureLogitsWarper(p.temperature)(ids, x_1V)
    if p.top_k > 0:
        x_1V = TopKLogitsWarper(p.top_k)(ids, x_1V)
    if p.top_p < 1:
        x_1V = TopPLogitsWarper(p.top_p)(ids, x_1V)
    if p.min_p > 0:
        x_1V = MinPLogitsWarper(p.min_p)(ids, x_1V)
    return x_1V


WARP_CASES = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.05),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=0.5, top_p=0.6, min_p=0.1),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_transformers_warpers(seed):
    # All cases in one batch (plus a greedy row) so the per-row vectorised parameters are exercised together.
    g = torch.Generator().manual_seed(seed)
    params = [SamplingParams(**kw) for kw in WARP_CASES] + [SamplingParams(temperature=0, top_k=3)]
    R, V = len(params), 64
    logits_RV = torch.randn(R, V, generator=g) * 2.5  # continuous: no ties, no mass exactly at a top_p boundary
    got_RV = process_logits(logits_RV, params, _empty(R), _empty(R), eos_id=None)
    for r, p in enumerate(params[:-1]):
        want = _hf_warp(logits_RV[r:r + 1].clone(), p)[0]
        assert torch.equal(torch.isinf(got_RV[r]), torch.isinf(want)), WARP_CASES[r]
        keep = ~torch.isinf(want)
        assert keep.sum() >= 1
        torch.testing.assert_close(got_RV[r][keep], want[keep])
    assert torch.equal(got_RV[-1], logits_RV[-1])  # greedy: no temperature, no filters


def test_top_p_keeps_smallest_prefix_reaching_top_p():
    # probs 0.5, 0.3, 0.2: top_p=0.5 keeps one token, 0.8 keeps two (0.5+0.3 reaches it), 0.81 keeps three.
    logits_1V = torch.tensor([[0.5, 0.3, 0.2]]).log()
    for top_p, kept in [(0.5, 1), (0.79, 2), (0.81, 3), (0.1, 1)]:
        x = process_logits(logits_1V, [SamplingParams(top_p=top_p)], [[]], [[]], eos_id=None)
        assert torch.isfinite(x).sum().item() == kept, top_p


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(3)
    logits_RV = torch.randn(5, 100, generator=g)
    params = [SamplingParams(temperature=0, top_p=0.3, top_k=2)] * 5
    out = sample(logits_RV, params, _empty(5), _empty(5), [None] * 5, eos_id=None)
    assert out.token_ids == logits_RV.argmax(-1).tolist() and out.logprobs == [None] * 5


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop = 3, 5
    logits_1V = torch.tensor([[0.0, 0.1, 0.2, 9.0, 0.3, 8.0, 0.4, 0.5]])  # eos, then the stop id, dominate
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[stop])
    x = process_logits(logits_1V, [p], [[]], [[7]], eos_id=eos)
    assert x[0, eos] == float("-inf") and x[0, stop] == float("-inf")
    assert sample(logits_1V, [p], [[]], [[7]], [None], eos_id=eos).token_ids == [7]
    assert sample(logits_1V, [p], [[]], [[7, 7]], [None], eos_id=eos).token_ids == [eos]  # reached: allowed
    # ignore_eos: EOS ends nothing, so it is an ordinary token; the stop id stays masked.
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[stop], ignore_eos=True)
    assert sample(logits_1V, [p], [[]], [[]], [None], eos_id=eos).token_ids == [eos]
    # Sampling rows never draw a masked id either.
    p = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[stop])
    gen = torch.Generator().manual_seed(0)
    out = sample(logits_1V.expand(200, -1), [p] * 200, _empty(200), _empty(200), [gen] * 200, eos_id=eos)
    assert not {eos, stop} & set(out.token_ids)


def test_seeded_row_independent_of_batch_composition():
    V, steps = 50, 8
    g = torch.Generator().manual_seed(123)
    logits_A = [torch.randn(V, generator=g) * 2 for _ in range(steps)]
    pA = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=7)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=9)]

    def run(layout):  # layout: list of "A" or an index into `others`; A's position varies by layout
        params = [pA if s == "A" else others[s] for s in layout]
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        outs = [[] for _ in layout]
        noise = torch.Generator().manual_seed(len(layout))  # other rows' logits differ per layout
        for t in range(steps):
            rows = [logits_A[t] if s == "A" else torch.randn(V, generator=noise) for s in layout]
            res = sample(torch.stack(rows), params, [[1, 2, 3]] * len(layout), outs, gens, eos_id=None)
            for o, tok in zip(outs, res.token_ids):
                o.append(tok)
        return outs[layout.index("A")]

    alone = run(["A"])
    assert len(set(alone)) > 1  # actually random, not a degenerate argmax
    assert run([0, "A", 1]) == alone
    assert run([2, 1, 0, "A"]) == alone
    assert run(["A", 2, 2]) == alone


def test_draw_rows_is_the_inverse_cdf_and_never_draws_zero_weight(monkeypatch):
    # V = 200: three 64-token blocks and a ragged fourth; zero weights at block edges, and the whole last block.
    w_V = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    w_V[[0, 63, 64, 127, 128]] = 0
    w_V[192:] = 0
    cum = w_V.cumsum(0)
    total = float(cum[-1])
    # u = 0 and u = 1 - 2^-53 (the largest draw), and the middle of each token's interval for the tokens next to
    # the zeros (an interval's edges are where fp32 block sums may round either way).
    mid = [float(cum[j - 1] + cum[j]) / 2 / total for j in (1, 2, 62, 65, 126, 129, 191)]
    us = [0.0, 1 - 2**-53] + mid
    monkeypatch.setattr(sampler, "_uniforms", lambda gens, device: torch.tensor(us, dtype=torch.float64))
    got = draw_rows(w_V.float().expand(len(us), -1).contiguous(), [None] * len(us)).tolist()
    # The reference in plain Python: the first token whose cumulative weight exceeds u * total.
    want = [next(j for j in range(200) if float(cum[j]) > u * total) for u in us]
    assert got == want == [1, 191, 1, 2, 62, 65, 126, 129, 191]
    assert all(w_V[j] > 0 for j in got)


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("top_p, dtype", [(0.9, torch.float32), (1.0, torch.bfloat16)])  # filtered; temperature only
def test_sample_distribution_matches_process_logits(seeded, top_p, dtype):
    N = 20000
    logits_1V = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -1.0]], dtype=dtype)
    p = SamplingParams(temperature=0.7, top_p=top_p)
    want_V = process_logits(logits_1V, [p], [[]], [[]], eos_id=None).softmax(-1)[0].double()
    support = want_V > 0
    assert 2 <= support.sum() <= 6
    torch.manual_seed(0)
    gens = [torch.Generator().manual_seed(0)] * N if seeded else [None] * N  # one generator, N sequential draws
    out = sample(logits_1V.expand(N, -1), [p] * N, _empty(N), _empty(N), gens, eos_id=None)
    counts_V = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    assert counts_V[~support].sum() == 0  # filtered tokens are never drawn
    assert top_p == 1 or support.sum() < 6  # top_p really cut something
    expected = N * want_V[support]
    chi2 = ((counts_V[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_CRIT_P001[int(support.sum()) - 1], (chi2, counts_V.tolist(), expected.tolist())


def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(5)
    R, V = 3, 30
    logits_RV = torch.randn(R, V, generator=g) * 2
    params = [SamplingParams(logprobs=None), SamplingParams(logprobs=0, temperature=0.5, repetition_penalty=1.5),
              SamplingParams(logprobs=5, temperature=0, top_k=3, frequency_penalty=1.0)]
    output = [[1, 2], [4, 4, 5], [logits_RV[2].argmax().item()] * 3]  # row 2's penalty moves its argmax
    gens = [torch.Generator().manual_seed(i) for i in range(R)]
    out = sample(logits_RV, params, _empty(R), output, gens, eos_id=None)
    ref_RV = torch.log_softmax(logits_RV, dim=-1)
    assert out.logprobs[0] is None
    for r in (1, 2):
        lp = out.logprobs[r]
        assert lp.token_id == out.token_ids[r]
        assert lp.logprob == pytest.approx(ref_RV[r, lp.token_id].item(), abs=1e-6)
        k = params[r].logprobs
        top_lp, top_id = ref_RV[r].topk(k)
        assert [t for t, _ in lp.top] == top_id.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_lp.tolist(), abs=1e-6)
    assert out.logprobs[1].top == []
    assert out.token_ids[2] != logits_RV[2].argmax().item()  # sampled from penalised, reported raw
