"""Everything FP8, as two transforms of a built model:

    apply_fp8(model)      FP8 training: the decoder's GEMMs in e4m3 with 1×128 / 128×128 scales   training.py
    fp8_weights(model)    FP8 inference weights: linears and routed experts held in e4m3           inference.py

and what they stand on, each Triton kernel beside its torch reference: the block format DeepSeek's checkpoints
store (format.py), quantization (quantize.py), the block-scaled and weight-only GEMMs (gemm.py), and the grouped
GEMMs of the routed experts (grouped.py). Imports flow io -> fp8 -> model, kernels: never the other way.
"""
from dsv3.fp8.inference import fp8_weights
from dsv3.fp8.training import apply_fp8

__all__ = ["apply_fp8", "fp8_weights"]
