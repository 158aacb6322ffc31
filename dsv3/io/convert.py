"""`dsv3 convert`: FP8 (128×128 block-scaled, DeepSeek format) <-> bf16, tensor by tensor.

Streams the source checkpoint (one tensor in memory at a time, one output shard buffered), so it works for
checkpoints far larger than memory, like DeepSeek's own fp8_cast_bf16.py. Tokenizer files are copied along.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.io import fp8
from dsv3.io.hf import _FP8_NAME, _read, _weight_map, write_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def convert(src: str | Path, dst: str | Path, to: str, ue8m0: bool = False,
            max_shard_bytes: int = 4 << 30) -> Path:
    if to not in ("bf16", "fp8"):
        raise ValueError(f"to={to!r} must be 'bf16' or 'fp8'")
    src = Path(src)
    cfg = ModelConfig.from_json(src)
    qcfg = None
    if to == "fp8":
        qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if ue8m0:
            qcfg["scale_fmt"] = "ue8m0"
    wm = _weight_map(src)
    handles: dict = {}

    def tensors():
        for name, f in wm.items():
            if name.endswith("_scale_inv"):
                continue
            t = _read(handles, f, name)
            if t.dtype == fp8.FP8:
                scale_name = name + "_scale_inv"
                if scale_name not in wm:
                    raise ValueError(f"{f}: FP8 tensor {name} has no {scale_name}")
                t = fp8.dequantize(t, _read(handles, wm[scale_name], scale_name), torch.bfloat16, name)
            if name.endswith("e_score_correction_bias"):
                yield name, t.float()
            elif to == "fp8" and _FP8_NAME.fullmatch(name):
                q, s = fp8.quantize(t, ue8m0)
                yield name, q
                yield name + "_scale_inv", s
            else:
                yield name, t.to(torch.bfloat16)

    extra = {n: src / n for n in TOKENIZER_FILES if (src / n).is_file()}
    try:
        return write_checkpoint(dst, cfg.replace(quantization_config=qcfg), tensors(), "bfloat16",
                                max_shard_bytes, extra)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
