"""`dsv3 info --tp N --gpu-memory GB`: the memory plan of tensor-parallel serving (dsv3/info.py), against a count
by hand from DeepSeek-V3's published shapes (docs/inference.md#tensor-parallel-layout)."""
import json
import math
import subprocess
import sys

import pytest

from dsv3 import preset
from dsv3.info import RESERVE_GB, memory_plan

# DeepSeek-V3 (its config.json): hidden, heads, q / kv LoRA ranks, head dims, layers, dense width, expert width,
# routed experts, vocabulary, MTP depth.
D, H, QL, KVL, NOPE, ROPE, V = 7168, 128, 1536, 512, 128, 64, 128
LAYERS, DENSE, MOE, MTP, I, F, E, VOCAB = 61, 3, 58, 1, 18432, 2048, 256, 129280


def fp8(rows, cols):
    """One e4m3 matrix and its fp32 scale per 128×128 block."""
    return rows * cols + scales(rows, cols)


def bf16(*shape):
    return 2 * math.prod(shape)


def scales(rows, cols):
    return math.ceil(rows / 128) * math.ceil(cols / 128) * 4


def hand_count(n: int, fp8=fp8, bf16=bf16, bias: int = 4) -> int:
    """Bytes of weights one of n ranks holds: heads, dense and shared-expert widths, vocabulary and eh_proj's
    output split n ways; n_routed / n whole experts; q_a, kv_a, norms and the router whole; FP8 where DeepSeek
    stores FP8 (kv_b_proj stays bf16: absorbed attention folds it into dense matrices), bf16 elsewhere, the routing
    bias fp32. Routed experts as DeepSeek's checkpoint holds them: gate, up and down per expert. Other `fp8`, `bf16`
    and `bias` (bytes per routing-bias entry) count one kind alone: `hand_count(n, scales, nothing, 0)`, the fp32
    scale grids."""
    attention = (fp8(QL, D) + fp8(H * (NOPE + ROPE) // n, QL) + fp8(KVL + ROPE, D) + fp8(D, H * V // n)
                 + bf16(H * (NOPE + V) // n, KVL) + bf16(D) * 2 + bf16(QL) + bf16(KVL))  # + input/post norms
    dense = 2 * fp8(I // n, D) + fp8(D, I // n)
    moe = (bf16(E, D) + bias * E + 2 * fp8(F // n, D) + fp8(D, F // n)  # router, bias, shared expert
           + E // n * (2 * fp8(F, D) + fp8(D, F)))
    mtp_own = bf16(D) * 3 + bf16(D // n, 2 * D)  # enorm, hnorm, shared_head.norm; eh_proj
    return ((LAYERS + MTP) * attention + DENSE * dense + (MOE + MTP) * moe + 2 * bf16(VOCAB // n, D) + bf16(D)
            + mtp_own)


def test_deepseek_v3_at_8_ranks_equals_the_count_by_hand():
    cfg = preset("deepseek-v3")
    h200, h100 = memory_plan(cfg, 8, 141, fp8_weights=True), memory_plan(cfg, 8, 80, fp8_weights=True)
    weights = hand_count(8)
    assert h200["weight_bytes_per_rank"] == weights == h100["weight_bytes_per_rank"]
    assert 86.6e9 < weights < 86.9e9  # the "about 86.6 × 10⁹ bytes with MTP", kv_b_proj in bf16 beside
    assert h200["cache_bytes_per_token"] == 70_272 == LAYERS * (KVL + ROPE) * 2
    assert h200["mtp_cache_bytes_per_token"] == (KVL + ROPE) * 2
    per_token = 70_272 + 1_152
    assert h200["cache_tokens_fit"] == (141 * 10**9 - weights - int(RESERVE_GB * 1e9)) // per_token
    assert h200["fits"] and not h100["fits"] and h100["cache_tokens_fit"] == 0


def test_one_rank_bf16_and_the_scales_of_a_split_follow_the_slice():
    cfg = preset("deepseek-v3")
    assert memory_plan(cfg, 1)["weight_bytes_by_kind"]["fp8"] == 0
    by_kind = memory_plan(cfg, 8, fp8_weights=True)["weight_bytes_by_kind"]
    assert by_kind["fp32"] == (MOE + MTP) * 4 * E
    nothing = lambda *shape: 0  # noqa: E731
    assert by_kind["scales"] == hand_count(8, scales, nothing, 0)  # the grids of each rank's slices, whole blocks


def test_what_does_not_split_is_named_before_anything_loads():
    cfg = preset("deepseek-v3")
    with pytest.raises(ValueError, match=r"num_attention_heads=128; n_routed_experts=256"):
        memory_plan(cfg, 6)
    # 16 ranks: o_proj's 16384 inputs split into 1024 = 8 blocks each, shared experts' 2048 into 128: still whole
    # blocks; 32 ranks leave 64 columns of a shared expert per rank, half a block, which FP8 cannot split.
    memory_plan(cfg, 16, fp8_weights=True)
    with pytest.raises(ValueError, match=r"shared_experts.gate_proj.weight dimension 0 of 2048 \(FP8"):
        memory_plan(cfg, 32, fp8_weights=True)
    memory_plan(cfg, 32)  # in bf16 the same split is fine


def test_info_cli_prints_the_plan_and_json_says_whether_it_fits():
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv3", "info", "deepseek-v3", *a],  # noqa: E731
                                    capture_output=True, text=True)
    out = run("--tp", "8", "--gpu-memory", "80", "--fp8-weights", "--json")
    plan = json.loads(out.stdout)["plan"]
    assert plan["fits"] is False and plan["weight_bytes_per_rank"] == hand_count(8)
    text = run("--tp", "8", "--gpu-memory", "141", "--fp8-weights").stdout
    assert "86.75 GB" in text and "fits" in text and "DOES NOT FIT" not in text
    bad = run("--tp", "3")
    assert bad.returncode != 0 and "num_attention_heads=128" in bad.stderr


def test_serve_refuses_up_front_when_the_plan_does_not_fit():
    from dsv3.info import refuse_unless_fits
    with pytest.raises(SystemExit, match=r"does not fit this GPU; nothing was loaded:(.|\n)*DOES NOT FIT"):
        refuse_unless_fits(preset("deepseek-v3"), 80 * 10**9, fp8_weights=True)
    # deepseek-v2-lite: 15.7B parameters, 31.4 GB in bf16, 62.8 GB in fp32, 5.1 GB of cache for its whole context
    lite = preset("deepseek-v2-lite")
    assert refuse_unless_fits(lite, 70 * 10**9, fp8_weights=False)["fits"]
    with pytest.raises(SystemExit, match="fp32 weights"):
        refuse_unless_fits(lite, 70 * 10**9, fp8_weights=False, dtype_bytes=4)
