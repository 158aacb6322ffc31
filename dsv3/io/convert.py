"""`dsv3 convert`: FP8 (128×128 block-scaled, DeepSeek format) <-> bf16, tensor by tensor.

Streams the source checkpoint (one tensor in memory at a time, one output shard buffered), so it works for
checkpoints far larger than memory, like DeepSeek's own fp8_cast_bf16.py. Tokenizer files are copied along.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.io.hf import close, export_tensors, fp8_quantization_config, read_tensor, weight_map, write_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def convert(src: str | Path, dst: str | Path, to: str, ue8m0: bool = False,
            max_shard_bytes: int = 4 << 30) -> Path:
    if to not in ("bf16", "fp8"):
        raise ValueError(f"to={to!r} must be 'bf16' or 'fp8'")
    src = Path(src)
    cfg = ModelConfig.from_json(src)
    wm = weight_map(src)
    handles: dict = {}
    # FP8 sources are dequantized to fp32 on read, then cast to bf16 or re-quantized from fp32.
    named = ((name, read_tensor(handles, wm, name)) for name in wm if not name.endswith("_scale_inv"))
    extra = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    qcfg = fp8_quantization_config(ue8m0) if to == "fp8" else None
    try:
        return write_checkpoint(dst, cfg.replace(quantization_config=qcfg),
                                export_tensors(named, torch.bfloat16, to == "fp8", ue8m0), "bfloat16",
                                max_shard_bytes, extra)
    finally:
        close(handles)
