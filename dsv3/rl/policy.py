"""The policy that SFT and GRPO train: a checkpoint loaded for fine-tuning, with its tokenizer."""
from __future__ import annotations

import torch

from dsv3.io import load_model
from dsv3.runtime import resolve_device
from dsv3.tokenizer import Tokenizer


def load_policy(path: str, device: str, param_dtype: str, threads: int | None = None):
    """-> (model in train mode, its tokenizer, device) from a checkpoint directory with tokenizer files."""
    if not path:
        raise ValueError("--init-from: a checkpoint directory (Hugging Face layout with tokenizer files) is needed")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if param_dtype == "bf16" and dev.type == "cuda" else torch.float32
    tok = Tokenizer.from_dir(path)
    model = load_model(path, device=dev, dtype=dtype)
    for moe in model.moe_layers():
        moe.balance_coef = 0.0  # fine-tuning adds no balance loss
    return model.train(), tok, dev
