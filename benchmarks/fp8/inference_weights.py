"""FP8 weights at inference on the GPU: logits of the model holding e4m3 weights (dsv3/fp8/inference.py, the
Triton W8 kernels) against the same model holding their dequantized values in bf16, both against an fp32 copy
of the latter (the yardstick: how far bf16 alone drifts), and how often the two agree on the argmax. Random weights,
prefill and decode-sized batches.

    python -m benchmarks.fp8.inference_weights [--preset bench-684m]      # a GPU (the W8 kernels are Triton)
Results: docs/fp8.md#fp8-inference-weights; saved as
benchmarks/results/fp8/inference_weights-<preset>_<device>_<date>.json.
"""
import argparse
import copy

import torch

from benchmarks.results import device_name, save
from dsv3.config import preset
from dsv3.fp8 import fp8_weights
from dsv3.fp8.format import dequantize_blocks
from dsv3.fp8.inference import Fp8WeightExperts, Fp8WeightLinear
from dsv3.io.hf import build_model


def compare(model, cfg, dev: str) -> dict:
    """Logits' relative error against fp32 of the FP8-weight model and of its dequantized values in bf16, per shape."""
    ref = copy.deepcopy(model)
    conversion = fp8_weights(model)
    print(conversion)
    out = {"fp8_weights": conversion}
    with torch.no_grad():
        for name, m in model.named_modules():
            r = ref.get_submodule(name)
            if isinstance(m, Fp8WeightLinear):
                r.weight.copy_(dequantize_blocks(m.weight, m.weight_scale_inv))
            elif isinstance(m, Fp8WeightExperts):
                for w, s in zip(("gate_up_proj", "down_proj"), (m.gate_up_proj_scale_inv, m.down_proj_scale_inv)):
                    getattr(r, w).copy_(dequantize_blocks(getattr(m, w), s))
        ref32 = copy.deepcopy(ref).float()
        for B, T in ((1, 1), (8, 1), (2, 64), (1, 300)):
            ids = torch.randint(2, cfg.vocab_size, (B, T), device=dev)
            a, b, c = (mod(ids).logits.double() for mod in (model, ref, ref32))
            err = lambda x: ((x - c).norm() / c.norm()).item()  # noqa: E731
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            out[f"batch_{B}x{T}"] = {"err_fp8_weights": err(a), "err_bf16": err(b), "argmax_agreement": agree}
            print(f"batch {B} x {T} tokens: logits' error against fp32: FP8 weights {err(a):.2e}, the same values in "
                  f"bf16 {err(b):.2e}; argmax agreement FP8 vs bf16 {agree:.3f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)
    model = build_model(cfg, dev, torch.bfloat16)
    model.init_weights()
    model.eval()
    save(__file__, args, compare(model, cfg, dev), tag=args.preset, device=device_name(dev))


if __name__ == "__main__":
    main()
