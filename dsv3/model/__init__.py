"""The DeepSeek-V3 model: single-device, trainable, CPU-runnable.

Shape legend (used in comments and name suffixes across dsv3):
  B batch, T query tokens, S cache length (keys), D hidden, H heads, Dn / Dr / Dv nope / rope / value head dims,
  C kv_lora_rank, Q q_lora_rank, E routed experts, K top-k, G expert groups, V vocab, F expert hidden,
  N = T·K routed rows, L layers.
"""
from dsv3.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
