"""Checkpoint I/O: the one Hugging Face <-> dsv3 name table, safetensors load / save (FP8 block scales:
dsv3/fp8/format.py)."""
from dsv3.io.hf import load_model, save_model

__all__ = ["load_model", "save_model"]
