"""dsv3.rl.loss (group advantages + clipped GRPO policy loss) against independent references.

References used here:
  * hand evaluation in plain Python over floats (math.exp / min / max, one token at a time, explicit loops over
    sequences and groups) of the advantage formula (group mean, Bessel std + 1e-4), of the clipped per-token
    objective with the k3 KL term, of the three aggregations, and of the per-token gradient dL/dlogp derived by
    hand (piecewise in the clip branch);
  * the closed form of DeepSeekMath App. A.1.6 for the gradient at rho == 1 (a single policy update per batch);
  * TRL's GRPOTrainer: its `_compute_loss` run on a bare trainer instance whose model forward is replaced by the
    test tensors, and its reward normalisation code executed verbatim from `_generate_and_score_completions`.

All hand comparisons are in float64 with |difference| <= 1e-10.
"""
import inspect
import math
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dsv3.rl.loss import group_advantages, policy_loss

G = 4                       # group size
T = 6                       # completion width
TOL = 1e-10
AGGREGATIONS = ["grpo", "dapo", "dr_grpo"]
SCALES = ["group", "batch", "none"]

# Two groups of 4. Group 0 has a tie (1.0 twice) in both sets; "all_equal" makes group 1 constant (advantage 0),
# "ties" gives group 1 three equal rewards and one different.
REWARDS = {
    "all_equal": [1.0, 0.0, 1.0, 0.25, 0.7, 0.7, 0.7, 0.7],
    "ties": [1.0, 0.0, 1.0, 0.25, 0.3, 0.9, 0.3, 0.3],
}

# Mask rows: 0 and 3 fill the width (truncated at max length), 1/4/7 are right-padded, row 2 keeps a single token,
# row 5 is fully masked, row 6 has interior holes (e.g. tool-output tokens masked out).
MASK_ROWS = [
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0],
    [1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 0],
    [1, 1, 0, 0, 0, 0],
]

# log(rho) levels: ln 0.8 = -0.223, ln 1.2 = 0.182, ln 1.28 = 0.247. So -0.5 is below 1 - eps_low, -0.15 and 0.1
# are inside the clip range, 0.21 is between 1.2 and 1.28 (clipped for eps_high 0.2 only), 0.4 is above 1.28.
LOG_RATIO_LEVELS = [-0.5, -0.15, 0.1, 0.21, 0.4]


def make_batch(rewards_key: str = "all_equal", seed: int = 0) -> dict:
    """Hand-built float64 batch: random log-probs, old log-probs offset by the levels above (+-0.01 jitter, cycling
    so every row with enough tokens sees every level), reference log-probs different again."""
    g = torch.Generator().manual_seed(seed)
    N = len(MASK_ROWS)
    logp = -(0.05 + 2.5 * torch.rand(N, T, generator=g, dtype=torch.float64))
    levels = torch.tensor([[LOG_RATIO_LEVELS[(t + 2 * i) % 5] for t in range(T)] for i in range(N)],
                          dtype=torch.float64)
    log_ratio = levels + 0.02 * (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5)
    old = logp - log_ratio
    ref = logp + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)
    return dict(logp=logp, old=old, ref=ref, mask=torch.tensor(MASK_ROWS, dtype=torch.float64),
                rewards=torch.tensor(REWARDS[rewards_key], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# Hand references (plain Python floats)
# ----------------------------------------------------------------------------------------------------------------

def hand_advantages(rewards: list, group_size: int, scale: str, eps: float = 1e-4) -> list:
    def mean(xs):
        s = 0.0
        for x in xs:
            s += x
        return s / len(xs)

    def std(xs):  # Bessel-corrected
        m = mean(xs)
        s = 0.0
        for x in xs:
            s += (x - m) ** 2
        return math.sqrt(s / (len(xs) - 1))

    out = []
    for start in range(0, len(rewards), group_size):
        grp = rewards[start:start + group_size]
        m = mean(grp)
        for r in grp:
            a = r - m
            if scale == "group":
                a = a / (std(grp) + eps)
            elif scale == "batch":
                a = a / (std(rewards) + eps)
            else:
                assert scale == "none"
            out.append(a)
    return out


def hand_token(logp, old, ref, a, beta, eps_low, eps_high):
    """Per-token loss and its derivative w.r.t. logp."""
    rho = math.exp(logp - old)
    unclipped = rho * a
    clipped = min(max(rho, 1 - eps_low), 1 + eps_high) * a
    loss = -min(unclipped, clipped)
    if unclipped <= clipped:
        # the ratio branch is selected (inside the clip range the two are equal and both have slope rho * a)
        dloss = -rho * a
    else:
        # the clipped branch is strictly smaller, so rho is outside [1-eps_low, 1+eps_high]: constant in logp
        dloss = 0.0
    if beta != 0:
        x = ref - logp
        loss += beta * (math.exp(x) - x - 1)
        dloss += beta * (1 - math.exp(x))
    return loss, dloss


def hand_policy_loss(b: dict, adv: list, *, beta, eps_low, eps_high, aggregation, rows=None, cols=None,
                     num_sequences=None, num_tokens=None, max_completion_length=None):
    """Returns (loss, grad as list of lists over the selected rows x cols)."""
    rows = list(range(len(MASK_ROWS))) if rows is None else rows
    cols = T if cols is None else cols
    logp, old, ref, mask = (b[k].tolist() for k in ("logp", "old", "ref", "mask"))
    lengths = {i: sum(1 for t in range(cols) if mask[i][t]) for i in rows}
    S = len(rows) if num_sequences is None else num_sequences
    K = sum(lengths.values()) if num_tokens is None else num_tokens
    M = cols if max_completion_length is None else max_completion_length
    total = 0.0
    grad = []
    for i in rows:
        if aggregation == "grpo":
            w = 1.0 / (S * lengths[i]) if lengths[i] else 0.0
        elif aggregation == "dapo":
            w = 1.0 / K
        else:
            w = 1.0 / (S * M)
        seq_sum = 0.0
        grow = []
        for t in range(cols):
            if not mask[i][t]:
                grow.append(0.0)
                continue
            lt, dt = hand_token(logp[i][t], old[i][t], ref[i][t], adv[i], beta, eps_low, eps_high)
            seq_sum += lt
            grow.append(w * dt)
        grad.append(grow)
        if aggregation == "grpo":
            total += (seq_sum / lengths[i]) / S if lengths[i] else 0.0
        elif aggregation == "dapo":
            total += seq_sum / K
        else:
            total += seq_sum / (S * M)
    return total, grad


def hand_metrics(b: dict, adv: list, *, beta, eps_low, eps_high) -> dict:
    logp, old, ref, mask = (b[k].tolist() for k in ("logp", "old", "ref", "mask"))
    n = low = high = 0
    kl = 0.0
    for i in range(len(mask)):
        for t in range(T):
            if not mask[i][t]:
                continue
            n += 1
            rho = math.exp(logp[i][t] - old[i][t])
            low += rho < 1 - eps_low and adv[i] < 0
            high += rho > 1 + eps_high and adv[i] > 0
            x = ref[i][t] - logp[i][t]
            kl += math.exp(x) - x - 1
    out = {"clip_low": low / n, "clip_high": high / n}
    if beta != 0:
        out["kl"] = kl / n
    return out


def branch_counts(b: dict, adv: list, eps_low: float, eps_high: float) -> dict:
    """How many masked tokens fall in each region of the clipped objective."""
    logp, old, mask = (b[k].tolist() for k in ("logp", "old", "mask"))
    c = defaultdict(int)
    for i in range(len(mask)):
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            assert abs(rho - (1 - eps_low)) > 1e-3 and abs(rho - (1 + eps_high)) > 1e-3, "rho too close to a bound"
            if a > 0 and rho > 1 + eps_high:
                c["clipped_high"] += 1
            elif a < 0 and rho < 1 - eps_low:
                c["clipped_low"] += 1
            elif a > 0 and rho < 1 - eps_low:
                c["pos_adv_below_range"] += 1  # not clipped: the ratio term is the min
            elif a < 0 and rho > 1 + eps_high:
                c["neg_adv_above_range"] += 1  # not clipped: the ratio term is the min
            elif a != 0:
                c["inside_range"] += 1
            else:
                c["zero_adv"] += 1
            if a > 0 and 1.2 < rho < 1.28:
                c["pos_adv_between_1.2_1.28"] += 1
    return c


def as_t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run_loss(b, adv, *, beta, eps_high, aggregation, mask=None, **kw):
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, b["old"], adv, b["mask"] if mask is None else mask, ref_logp_NT=b["ref"],
                                beta=beta, eps_low=0.2, eps_high=eps_high, aggregation=aggregation, **kw)
    loss.backward()
    return loss, logp.grad, metrics


# ----------------------------------------------------------------------------------------------------------------
# 1. loss and gradient against the hand evaluation, every combination
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rewards_key", list(REWARDS))
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_test_data_exercises_every_branch(rewards_key, eps_high):
    b = make_batch(rewards_key)
    adv = hand_advantages(b["rewards"].tolist(), G, "group")
    c = branch_counts(b, adv, 0.2, eps_high)
    for region in ["clipped_high", "clipped_low", "pos_adv_below_range", "neg_adv_above_range", "inside_range",
                   "pos_adv_between_1.2_1.28"]:
        assert c[region] > 0, (region, dict(c))
    if rewards_key == "all_equal":
        assert c["zero_adv"] > 0
    assert len(set(REWARDS[rewards_key][:G])) < G  # ties in the rewards


@pytest.mark.parametrize("rewards_key", list(REWARDS))
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_grad_match_hand_evaluation(aggregation, scale, beta, eps_high, rewards_key):
    b = make_batch(rewards_key)
    adv = group_advantages(b["rewards"], G, scale=scale)
    loss, grad, _ = run_loss(b, adv, beta=beta, eps_high=eps_high, aggregation=aggregation)

    hand_adv = hand_advantages(b["rewards"].tolist(), G, scale)
    ref_loss, ref_grad = hand_policy_loss(b, hand_adv, beta=beta, eps_low=0.2, eps_high=eps_high,
                                          aggregation=aggregation)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - ref_loss) <= TOL, (loss.item(), ref_loss)
    assert (grad - as_t(ref_grad)).abs().max().item() <= TOL
    # masked positions (including the fully masked row 5) get exactly zero gradient
    assert (grad[b["mask"] == 0] == 0).all()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_bool_mask_equals_float_mask(aggregation):
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G)
    lf, gf, mf = run_loss(b, adv, beta=0.04, eps_high=0.28, aggregation=aggregation)
    lb, gb, mb = run_loss(b, adv, beta=0.04, eps_high=0.28, aggregation=aggregation, mask=b["mask"].bool())
    assert abs(lf.item() - lb.item()) <= TOL
    assert (gf - gb).abs().max().item() <= TOL
    assert mf == pytest.approx(mb, abs=TOL)


def test_fully_masked_row_contributes_zero_without_nan():
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G)
    row = torch.tensor([5])
    assert b["mask"][5].sum() == 0 and adv[5] != 0
    logp = b["logp"][row].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, b["old"][row], adv[row], b["mask"][row], ref_logp_NT=b["ref"][row], beta=0.04,
                          aggregation="grpo")
    loss.backward()
    assert loss.item() == 0.0
    assert (logp.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 2. advantages
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rewards_key", list(REWARDS))
@pytest.mark.parametrize("scale", SCALES)
def test_advantages_match_hand_evaluation(scale, rewards_key):
    r = REWARDS[rewards_key]
    adv = group_advantages(as_t(r), G, scale=scale)
    assert adv.shape == (len(r),) and adv.dtype == torch.float64
    assert (adv - as_t(hand_advantages(r, G, scale))).abs().max().item() <= TOL
    # eps is honoured
    adv_eps = group_advantages(as_t(r), G, scale=scale, eps=0.5)
    assert (adv_eps - as_t(hand_advantages(r, G, scale, eps=0.5))).abs().max().item() <= TOL


@pytest.mark.parametrize("scale", SCALES)
def test_advantages_keep_input_dtype(scale):
    r = torch.tensor(REWARDS["ties"], dtype=torch.float32)
    adv = group_advantages(r, G, scale=scale)
    assert adv.dtype == torch.float32
    assert (adv.double() - as_t(hand_advantages(REWARDS["ties"], G, scale))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("value", [0.7, 1 / 3, -2.3, 0.0])
@pytest.mark.parametrize("scale", SCALES)
def test_all_equal_group_gets_exactly_zero_advantage(scale, value):
    r = as_t([1.0, 0.0, 1.0, 0.25] + [value] * G)
    adv = group_advantages(r, G, scale=scale)
    assert torch.isfinite(adv).all()
    assert (adv[G:] == 0).all()
    # a batch made only of constant groups (batch std 0 too) is still finite and zero
    adv0 = group_advantages(torch.full((2 * G,), value, dtype=torch.float64), G, scale=scale)
    assert torch.isfinite(adv0).all() and (adv0 == 0).all()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_all_equal_group_rows_have_zero_loss_and_grad_without_kl(scale, aggregation):
    b = make_batch("all_equal")
    adv = group_advantages(b["rewards"], G, scale=scale)
    # in the full batch, the rows of the constant group get exactly zero gradient
    _, grad, _ = run_loss(b, adv, beta=0.0, eps_high=0.28, aggregation=aggregation)
    assert (grad[G:] == 0).all()
    # alone (with the full batch's normalisers), those rows give exactly zero loss
    rows = slice(G, 2 * G)
    logp = b["logp"][rows].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, b["old"][rows], adv[rows], b["mask"][rows], beta=0.0, eps_high=0.28,
                          aggregation=aggregation, num_sequences=2 * G, num_tokens=int(b["mask"].sum()))
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 3. DeepSeekMath App. A.1.6 gradient at mu = 1 (rho == 1)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_on_policy_gradient_matches_deepseekmath_closed_form(aggregation, beta):
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G)
    logp = b["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, logp.detach(), adv, b["mask"], ref_logp_NT=b["ref"], beta=beta,
                          aggregation=aggregation)
    loss.backward()

    lp, ref, mask, a = b["logp"].tolist(), b["ref"].tolist(), b["mask"].tolist(), adv.tolist()
    N = len(mask)
    n_tokens = sum(sum(row) for row in mask)
    expected = [[0.0] * T for _ in range(N)]
    for i in range(N):
        length = sum(mask[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            w = {"grpo": 1 / (N * length), "dapo": 1 / n_tokens, "dr_grpo": 1 / (N * T)}[aggregation]
            pi_ref_over_pi = math.exp(ref[i][t] - lp[i][t])
            expected[i][t] = -(a[i] + beta * (pi_ref_over_pi - 1)) * w
    assert (logp.grad - as_t(expected)).abs().max().item() <= TOL
    assert (logp.grad[b["mask"] == 0] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# 4. minibatch additivity
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_minibatches_with_full_batch_counts_sum_to_full_batch(aggregation, beta):
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G, scale="batch")
    N = len(MASK_ROWS)
    full_loss, full_grad, _ = run_loss(b, adv, beta=beta, eps_high=0.28, aggregation=aggregation)

    # minibatch A holds the short rows (trimmed to width 4, as dynamic padding would), B the long ones
    mb_a, width_a = [1, 2, 4, 5, 7], 4
    mb_b = [0, 3, 6]
    assert b["mask"][mb_a, width_a:].sum() == 0
    logp = b["logp"].clone().requires_grad_(True)
    total = 0.0
    for rows, width in [(mb_a, width_a), (mb_b, T)]:
        idx = torch.tensor(rows)
        loss, _ = policy_loss(logp[idx, :width], b["old"][idx, :width], adv[idx], b["mask"][idx, :width],
                              ref_logp_NT=b["ref"][idx, :width], beta=beta, eps_high=0.28, aggregation=aggregation,
                              num_sequences=N, num_tokens=int(b["mask"].sum()), max_completion_length=T)
        loss.backward()
        total += loss.item()
        ref_loss, _ = hand_policy_loss(b, adv.tolist(), beta=beta, eps_low=0.2, eps_high=0.28,
                                       aggregation=aggregation, rows=rows, cols=width, num_sequences=N,
                                       num_tokens=int(b["mask"].sum()), max_completion_length=T)
        assert abs(loss.item() - ref_loss) <= TOL
    assert abs(total - full_loss.item()) <= TOL
    assert (logp.grad - full_grad).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------------
# 5. metrics
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale", SCALES)
def test_metrics_match_hand_counts(scale, beta, eps_high, aggregation):
    b = make_batch("all_equal")
    adv = group_advantages(b["rewards"], G, scale=scale)
    _, _, metrics = run_loss(b, adv, beta=beta, eps_high=eps_high, aggregation=aggregation)
    expected = hand_metrics(b, hand_advantages(b["rewards"].tolist(), G, scale), beta=beta, eps_low=0.2,
                            eps_high=eps_high)
    assert expected["clip_low"] > 0 and expected["clip_high"] > 0
    for k, v in expected.items():
        assert isinstance(metrics[k], float), (k, type(metrics[k]))
        assert abs(metrics[k] - v) <= TOL, (k, metrics[k], v)
    if beta == 0:
        assert "kl" not in metrics


def test_reference_logps_are_optional_without_kl_and_required_with_it():
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G)
    with_ref, m1 = policy_loss(b["logp"], b["old"], adv, b["mask"], ref_logp_NT=b["ref"], beta=0.0)
    without_ref, m2 = policy_loss(b["logp"], b["old"], adv, b["mask"], beta=0.0)
    assert with_ref.item() == without_ref.item() and m1 == m2
    with pytest.raises((ValueError, AssertionError, TypeError)):
        policy_loss(b["logp"], b["old"], adv, b["mask"], beta=0.04)


# ----------------------------------------------------------------------------------------------------------------
# 6. TRL parity
# ----------------------------------------------------------------------------------------------------------------

def trl_loss(b, adv, *, loss_type, beta, eps_high):
    """TRL GRPOTrainer._compute_loss on a bare instance: the model forward returns b['logp'] (a fresh leaf)."""
    trl = pytest.importorskip("trl")
    N = len(MASK_ROWS)
    logp = b["logp"].clone().requires_grad_(True)
    tr = object.__new__(trl.GRPOTrainer)
    tr._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, torch.zeros_like(logp), None)
    tr.loss_type, tr.beta, tr.epsilon_low, tr.epsilon_high = loss_type, beta, 0.2, eps_high
    tr.importance_sampling_level, tr.top_entropy_quantile, tr.off_policy_mask_threshold = "token", 1.0, None
    tr.aux_loss_enabled, tr._entropy_bonus_enabled = False, False
    tr.use_vllm, tr.vllm_importance_sampling_correction = False, False
    tr.max_completion_length = T
    tr.current_gradient_accumulation_steps = 1
    tr.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                     gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = dict(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1, dtype=torch.long),
                  completion_ids=torch.zeros(N, T, dtype=torch.long), completion_mask=b["mask"],
                  advantages=adv, old_per_token_logps=b["old"], ref_per_token_logps=b["ref"],
                  num_items_in_batch=b["mask"].sum())
    loss = tr._compute_loss(None, inputs)
    loss.backward()
    return loss, logp.grad, tr._metrics["train"]


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", AGGREGATIONS)
def test_matches_trl_grpo_trainer_loss(loss_type, beta, eps_high):
    b = make_batch("ties")
    adv = group_advantages(b["rewards"], G)
    t_loss, t_grad, t_metrics = trl_loss(b, adv, loss_type=loss_type, beta=beta, eps_high=eps_high)
    loss, grad, metrics = run_loss(b, adv, beta=beta, eps_high=eps_high, aggregation=loss_type)
    assert t_loss.dtype == torch.float64
    assert abs(loss.item() - t_loss.item()) <= TOL, (loss.item(), t_loss.item())
    assert (grad - t_grad).abs().max().item() <= TOL
    # TRL's metrics go through a float32 token count, hence the looser tolerance
    assert metrics["clip_low"] == pytest.approx(t_metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert metrics["clip_high"] == pytest.approx(t_metrics["clip_ratio/high_mean"][0], abs=1e-6)
    if beta != 0:
        assert metrics["kl"] == pytest.approx(t_metrics["kl"][0], rel=1e-6)


def trl_advantages(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """TRL's reward normalisation (the 'sum_then_normalize' branch of _generate_and_score_completions), executed
    from its own source with a single reward function of weight 1."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import nanstd
    src = inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    start = 'if self.multi_objective_aggregation == "sum_then_normalize":'
    end = 'elif self.multi_objective_aggregation == "normalize_then_sum":'
    assert start in src and end in src, "TRL's advantage code moved; update trl_advantages()"
    body = textwrap.dedent(src[src.index(start) + len(start):src.index(end)])
    ns = dict(torch=torch, nanstd=nanstd, device="cpu", num_generations=G, rewards_per_func=rewards[:, None],
              unscorable_mask=torch.zeros(len(rewards), dtype=torch.bool),
              self=SimpleNamespace(reward_weights=torch.ones(1, dtype=rewards.dtype), scale_rewards=scale))
    # TRL's nanstd computes the Bessel factor count / (count - 1) from integer tensors, i.e. in the default dtype;
    # under the float32 default that factor is rounded (4/3 -> 1.33333337), a ~1.5e-8 relative error in the std.
    # Run it with a float64 default so the comparison can be made at 1e-10.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exec(body, ns)
    finally:
        torch.set_default_dtype(prev)
    return torch.nan_to_num(ns["advantages"], nan=0.0)


@pytest.mark.parametrize("rewards_key", list(REWARDS))
@pytest.mark.parametrize("scale", SCALES)
def test_advantages_match_trl(scale, rewards_key):
    r = as_t(REWARDS[rewards_key])
    expected = trl_advantages(r, scale)
    assert (group_advantages(r, G, scale=scale) - expected).abs().max().item() <= TOL
