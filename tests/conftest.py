import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(min(2, torch.get_num_threads()))


def small_v3(**overrides) -> dict:
    """A tiny DeepSeek-V3 config as transformers' DeepseekV3Config kwargs (runs in well under a second)."""
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
              n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 0.8, "mscale_all_dim": 0.8})
    kw.update(overrides)
    return kw


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report also shows the logs its fixtures registered as `item.logs` ({title: () -> text}),
    e.g. what a server subprocess logged during the test (tests/test_clients.py)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for title, read in getattr(item, "logs", {}).items():
            report.sections.append((title, read()))


@pytest.fixture
def tiny_cfg():
    from dsv3 import ModelConfig
    return ModelConfig.from_hf_dict({"model_type": "deepseek_v3", **small_v3(), "num_nextn_predict_layers": 1})


def random_model(cfg, seed: int = 0, std: float = 0.1):
    """A dsv3 model with random weights and random (non-zero) routing biases, in eval mode."""
    import dsv3
    torch.manual_seed(seed)
    m = dsv3.Transformer(cfg)
    m.init_weights(std=std)
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_fresh(code: str, interpret: bool = True, timeout: int = 600) -> None:
    """Run `code` in a fresh Python (Triton reads TRITON_INTERPRET when it is imported), with TRITON_INTERPRET=1 or
    without it; the script must succeed and print a last line ending in "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
