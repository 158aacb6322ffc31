"""Our model against transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on random weights written by
their own save_pretrained (float32, relative Frobenius error ≤ 1e-5 over non-padded positions)."""
import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)

import dsv3
from conftest import rel_err, small_v3

LENS = [24, 17, 9]  # a right-padded batch with several sequence lengths


def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(LENS), max(LENS)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENS):
        mask[i, :n] = 1
    return ids, mask


def _randomize_biases(hf):
    # The checkpoint's routing bias must steer selection; transformers initializes it to zero.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)


def _compare(hf, ours, vocab):
    ids, mask = _batch(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids).logits
    for i, n in enumerate(LENS):
        assert rel_err(out[i, :n], ref[i, :n]) <= 1e-5, f"sequence {i}"


V3_CASES = {
    "sigmoid_noaux_tc_groups_yarn": {},
    "q_lora_rank_null": {"q_lora_rank": None},
    "rope_interleave_false": {"rope_interleave": False},
    "no_yarn": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "yarn_mscale_differs": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}},
    "first_k_dense_0_no_shared": {"first_k_dense_replace": 0, "n_shared_experts": 0},
    "two_shared_all_groups": {"n_shared_experts": 2, "n_group": 1, "topk_group": 1},
}


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_forward_matches_hf_deepseek_v3(tmp_path, case):
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**small_v3(**V3_CASES[case]))).float().eval()
    _randomize_biases(hf)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):  # transformers drops MTP layers
        ours = dsv3.load_model(tmp_path)
    _compare(hf, ours, hf.config.vocab_size)


V2_CASES = {
    "softmax_greedy": {"topk_method": "greedy", "n_group": None, "topk_group": None, "q_lora_rank": None},
    "softmax_group_limited_greedy": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                     "routed_scaling_factor": 16.0},
}


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_forward_matches_hf_deepseek_v2(tmp_path, case):
    torch.manual_seed(0)
    kw = small_v3(**V2_CASES[case])
    for key in ("rope_interleave",):
        kw.pop(key, None)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).float().eval()
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_model(tmp_path)
    assert ours.config.model_type == "deepseek_v2" and ours.config.scoring_func == "softmax"
    _compare(hf, ours, hf.config.vocab_size)


def test_save_roundtrip_loads_in_transformers(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    ours = dsv3.Transformer(tiny_cfg)
    ours.init_weights(std=0.1)
    with torch.no_grad():
        for layer in ours.layers[tiny_cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    dsv3.save_model(ours, tmp_path / "ckpt", max_shard_bytes=200_000)  # force several shards
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    _compare(hf, ours.eval(), tiny_cfg.vocab_size)
    # ... and back into dsv3 with MTP intact, identical tensors.
    again = dsv3.load_model(tmp_path / "ckpt")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
