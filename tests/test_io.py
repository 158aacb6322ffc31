"""Checkpoint I/O: FP8 128×128 blocks with ragged edges, dsv3 convert, atomic writes, clear errors."""
import json
import shutil

import pytest
import torch

import dsv3
from conftest import random_model, rel_err
from dsv3.fp8 import format as fp8
from dsv3.io.convert import convert
from dsv3.io.hf import write_checkpoint


def _tiny576(seed=0):
    return random_model(dsv3.preset("tiny-576").replace(vocab_size=256, num_hidden_layers=2), seed, std=0.05)


def test_fp8_block_scales_with_ragged_edges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 200, generator=g) * 0.02
    w[520, 150] = 3.0  # an outlier inside the ragged corner block (rows 512..575, cols 128..199)
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    # Hand-computed: each block's scale is its own amax / 448, over the rows and columns that exist.
    assert torch.isclose(s[4, 1], torch.tensor(3.0 / 448))
    assert torch.isclose(s[4, 0], w[512:, :128].abs().max() / 448)
    assert torch.isclose(s[0, 1], w[:128, 128:].abs().max() / 448)
    back = fp8.dequantize(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits: error ≤ half an ulp (|w|/16), plus the subnormal step (scale·2^-9).
    bound = w.abs() / 16 + fp8._expand(s, w.shape) * 2.0 ** -9
    assert ((back - w).abs() <= bound + 1e-12).all()
    assert back[520, 150] == 3.0


def test_fp8_ue8m0_scales_are_powers_of_two_and_never_overflow():
    w = torch.randn(130, 260) * 5
    q, s = fp8.quantize(w, ue8m0=True)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    assert (s >= fp8.quantize(w)[1]).all() and torch.isfinite(q.float()).all()


def test_dequantize_rejects_a_wrong_scale_grid():
    q, s = fp8.quantize(torch.randn(576, 256))
    with pytest.raises(ValueError, match=r"kv_a.*\(4, 2\).*\(5, 2\)"):
        fp8.dequantize(q, s[:4], name="kv_a")


def test_fp8_checkpoint_loads_back_within_fp8_rounding(tmp_path):
    m = _tiny576()
    dsv3.save_model(m, tmp_path / "fp8", fp8_blocks=True)
    cfg = json.loads((tmp_path / "fp8/config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    from safetensors import safe_open
    shard = next((tmp_path / "fp8").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        kv_a = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape == (576, 256)
        assert f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (5, 2)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router stays high precision
    back = dsv3.load_model(tmp_path / "fp8")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert rel_err(b, a) <= 0.04, k  # ~2.6% for a 128×128 e4m3 round trip (docs/fp8.md#checkpoint-format)


def test_convert_fp8_to_bf16_and_back(tmp_path):
    m = _tiny576()
    dsv3.save_model(m, tmp_path / "src", dtype=torch.bfloat16)
    (tmp_path / "src/tokenizer.json").write_text("{}")
    convert(tmp_path / "src", tmp_path / "fp8", "fp8", ue8m0=True)
    convert(tmp_path / "fp8", tmp_path / "bf16", "bf16")
    assert (tmp_path / "bf16/tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "bf16/config.json").read_text())
    q = json.loads((tmp_path / "fp8/config.json").read_text())["quantization_config"]
    assert q["scale_fmt"] == "ue8m0"
    a, b = dsv3.load_model(tmp_path / "fp8"), dsv3.load_model(tmp_path / "bf16")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert rel_err(y, x) <= 4e-3, k  # only bf16 rounding separates them


def test_save_is_atomic_and_keeps_the_old_checkpoint_on_failure(tmp_path):
    m = _tiny576()
    dsv3.save_model(m, tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())

    def broken():
        yield "a", torch.zeros(3)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "ck", m.config, broken(), "float32")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp directory left behind
    dsv3.load_model(tmp_path / "ck")


# ---- bad input: one clear error naming the file / tensor / field --------------------------------------------
def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dsv3.load_model(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json.*model_type='llama'"):
        dsv3.load_model(tmp_path)


def test_corrupted_safetensors(tmp_path):
    dsv3.save_model(_tiny576(), tmp_path / "ck")
    shard = next((tmp_path / "ck").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=shard.name):
        dsv3.load_model(tmp_path / "ck")


def test_wrong_missing_and_unexpected_tensors_are_listed(tmp_path):
    m = _tiny576()
    sd = dict(dsv3.io.hf.hf_tensors(m))
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    write_checkpoint(tmp_path / "ck", m.config, sd.items(), "float32")
    with pytest.raises(ValueError) as e:
        dsv3.load_model(tmp_path / "ck")
    msg = str(e.value)
    assert "model.layers.0.self_attn.o_proj.weight: checkpoint (3, 3), model (256, 128)" in msg
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in msg


def test_missing_mtp_weights_turn_mtp_off(tmp_path):
    m = _tiny576()
    sd = {k: v for k, v in dsv3.io.hf.hf_tensors(m) if not k.startswith("model.layers.2.")}
    write_checkpoint(tmp_path / "ck", m.config, sd.items(), "float32")
    with pytest.warns(UserWarning, match="MTP is off"):
        assert dsv3.load_model(tmp_path / "ck").config.num_nextn_predict_layers == 0


def test_missing_shard_named(tmp_path):
    dsv3.save_model(_tiny576(), tmp_path / "ck", max_shard_bytes=1 << 20)
    shard = sorted((tmp_path / "ck").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        dsv3.load_model(tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck")


def test_fp8_checkpoint_loads_into_fp8_weights_as_stored(tmp_path):
    # FP8 weights at inference straight from a checkpoint: each e4m3 tensor and scale grid of an FP8 checkpoint is
    # in the model bit for bit (never dequantized; an expert's gate and up stacked as gate_up_proj, their scales
    # too), kv_b_proj dense; a bf16 checkpoint quantizes as it loads exactly as converting after loading does.
    from safetensors import safe_open
    from dsv3.fp8 import fp8_weights
    from dsv3.io.hf import our_name
    m = _tiny576()
    dsv3.save_model(m, tmp_path / "fp8", fp8_blocks=True)
    dsv3.save_model(m, tmp_path / "bf16")
    got = dsv3.load_model(tmp_path / "fp8", fp8_weights=True)
    sd, seen = got.state_dict(), 0
    for shard in (tmp_path / "fp8").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype != fp8.FP8 or "kv_b_proj" in name:
                    continue
                key, where = our_name(name, got.config)
                q, s = sd[key], sd[key + "_scale_inv"]
                if where is not None:  # expert e; gate rows [0, F), up rows [F, 2F): scale rows / 128
                    q, s = q[where[0]], s[where[0]]
                    if len(where) > 1:
                        q, s = q[where[1]], s[where[1].start // 128: where[1].stop // 128]
                assert torch.equal(q.view(torch.uint8), t.view(torch.uint8)), name
                assert torch.equal(s, f.get_tensor(name + "_scale_inv")), name
                seen += 1
    assert seen >= 2 * (3 + 3 * 8)  # 2 layers: q_a, q_b, kv_a, o_proj, and MLP / shared + 8 experts' 3 each
    assert got.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="FP8 inference weights"):  # not a checkpoint layout: refused, by name
        dsv3.save_model(got, tmp_path / "again")
    loaded = dsv3.load_model(tmp_path / "bf16", fp8_weights=True).state_dict()
    converted = dsv3.load_model(tmp_path / "bf16")
    fp8_weights(converted)
    assert loaded.keys() == converted.state_dict().keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(loaded[k].view(torch.uint8) if v.dtype == fp8.FP8 else loaded[k],
                           v.view(torch.uint8) if v.dtype == fp8.FP8 else v), k
    # Experts 96 wide (not whole 128-row blocks): loaded in the model's dtype, then converted
    odd = random_model(dsv3.preset("tiny").replace(vocab_size=256, num_hidden_layers=2, moe_intermediate_size=96))
    dsv3.save_model(odd, tmp_path / "odd")
    a = dsv3.load_model(tmp_path / "odd", fp8_weights=True)
    b = dsv3.load_model(tmp_path / "odd")
    fp8_weights(b)
    assert a.layers[1].mlp.experts.gate_up_proj.dtype == fp8.FP8
    assert all(torch.equal(x.view(torch.uint8) if x.dtype == fp8.FP8 else x,
                           y.view(torch.uint8) if y.dtype == fp8.FP8 else y)
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))
