"""ModelConfig: Hugging Face config.json in both rope formats, validation errors that name field and value,
presets, and `dsv3 info` numbers for DeepSeek-V3 (docs/architecture.md#block-structure) counted on the meta
device."""
import json
import subprocess
import sys

import pytest
from dsv3 import ModelConfig, preset
from dsv3.config import PRESETS
from dsv3.info import model_stats
from dsv3.io.hf import build_model

V3_HUB = {  # the fields of deepseek-ai/DeepSeek-V3's config.json (docs/architecture.md#config-fields)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "initializer_range": 0.02, "attention_bias": False,
}


def test_reads_the_official_v3_config_and_writes_its_keys():
    cfg = ModelConfig.from_hf_dict(V3_HUB)
    assert cfg.rope_scaling["factor"] == 40 and cfg.quantization_config["quant_method"] == "fp8"
    out = cfg.to_hf_dict()
    for key, value in V3_HUB.items():
        if key not in ("initializer_range", "aux_loss_alpha"):  # ours carries the values we train with
            assert out[key] == value, key
    assert ModelConfig.from_hf_dict(out) == cfg


def test_rope_parameters_and_legacy_rope_scaling_are_the_same_config():
    legacy = ModelConfig.from_hf_dict(V3_HUB)
    new = dict(V3_HUB)
    rs = new.pop("rope_scaling")
    new.pop("rope_theta")
    new["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn",
                              "rope_theta": 10000.0}
    assert ModelConfig.from_hf_dict(new) == legacy and ModelConfig.from_hf_dict(new).rope_scaling == legacy.rope_scaling


@pytest.mark.parametrize("change, message", [
    ({"n_group": 3}, "n_group=3 must divide n_routed_experts=256"),
    ({"num_experts_per_tok": 40, "topk_group": 1}, "num_experts_per_tok=40 is larger than the 32 experts"),
    ({"topk_group": 9}, "topk_group=9 must be in 1..n_group=8"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "'dynamic' is an unknown rope type"),
    ({"topk_method": "top1"}, "topk_method='top1' is unknown"),
    ({"scoring_func": "relu"}, "scoring_func='relu' is unknown"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim=63 must be a positive even integer"),
    ({"model_type": "llama"}, "model_type='llama' is not supported"),
])
def test_inconsistent_values_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf_dict({**V3_HUB, **change})


def test_v2_defaults_and_q_lora_rank_zero():
    cfg = ModelConfig.from_hf_dict({"model_type": "deepseek_v2", "q_lora_rank": 0, "n_group": None,
                                    "num_experts_per_tok": 6, "n_routed_experts": 64})
    assert (cfg.q_lora_rank, cfg.topk_method, cfg.scoring_func, cfg.n_group) == (None, "greedy", "softmax", 1)
    assert cfg.num_nextn_predict_layers == 0 and not cfg.norm_topk_prob


def test_vocab_from_tokenizer_is_padded_to_64():
    assert preset("tiny").with_vocab(5000).vocab_size == 5056
    assert preset("tiny").with_vocab(128815).vocab_size == 128832


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta(name):
    s = model_stats(preset(name))
    assert s["total_params"] > 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_deepseek_v3_sizes_on_meta_device():
    model = build_model(preset("deepseek-v3"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    before = _rss_bytes()
    s = model_stats(preset("deepseek-v3"))
    assert _rss_bytes() - before < 200 * 2**20  # 671B parameters would be 1.3 TB in bf16
    assert abs(s["total_params"] / 671.03e9 - 1) < 0.005
    assert abs(s["total_params_with_mtp"] / 682.6e9 - 1) < 0.005
    assert abs(s["active_params"] / 37.55e9 - 1) < 0.005
    assert abs(s["active_params_without_embedding"] / 36.63e9 - 1) < 0.005
    assert s["kv_cache_bytes_per_token"] == 70_272  # 61 layers × (512 + 64) × 2 bytes
    assert "embedding" in s["conventions"]["active_params"]


def test_other_preset_sizes():
    assert abs(model_stats(preset("v3-slice"))["total_params"] / 2.91e9 - 1) < 0.005
    assert abs(model_stats(preset("bench-684m"))["total_params"] / 684e6 - 1) < 0.005


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "dsv3", "info", "deepseek-v3", "--json"], capture_output=True,
                         text=True, check=True).stdout
    s = json.loads(out)
    assert {"total_params", "active_params", "kv_cache_bytes_per_token", "mha_kv_cache_bytes_per_token"} <= set(s)
    assert s["mha_kv_cache_bytes_per_token"] == 61 * 128 * (192 + 128) * 2


def test_cli_bad_target_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", "no-such-thing"], capture_output=True, text=True)
    assert r.returncode != 0 and "neither a checkpoint directory" in r.stderr
