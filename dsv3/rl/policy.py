"""The policy that SFT and GRPO train: a checkpoint loaded for fine-tuning, with its tokenizer."""
from __future__ import annotations

import torch

from dsv3.io import load_model
from dsv3.runtime import resolve_device
from dsv3.tokenizer import Tokenizer
from dsv3.train.config import RuntimeConfig


def load_policy(path: str, runtime: RuntimeConfig):
    """-> (model in train mode, its tokenizer, device) from a checkpoint directory with tokenizer files."""
    if not path:
        raise ValueError("--init-from: a checkpoint directory (Hugging Face layout with tokenizer files) is needed")
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    dev = resolve_device(runtime.device)
    tok = Tokenizer.from_dir(path)
    model = load_model(path, device=dev, dtype=runtime.dtype(dev))
    for moe in model.moe_layers():
        moe.balance_coef = 0.0  # fine-tuning adds no balance loss
    return model.train(), tok, dev
