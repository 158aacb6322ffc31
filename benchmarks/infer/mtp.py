"""MTP speculative decoding on a model trained by `dsv3 train` (acceptance depends on training): decode tokens/s
with and without one MTP draft per step, acceptance rate, tokens per verify step, and whether the greedy
outputs agree.

Prompts are windows of the shipped corpus's text (the model's own domain), greedy, EOS ignored.

  dsv3 train --preset bench-684m --steps 300 --batch-size 16 --seq-len 2048 --vocab-size 32000 --lr 1e-3 \\
      --param-dtype bf16 --compile --out runs/mtp
  python -m benchmarks.infer.mtp runs/mtp/checkpoints/step_0000300/model --batches 1,32
Results: docs/inference.md#mtp-speculation; saved as benchmarks/results/infer/mtp_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.results import save
from dsv3 import Engine, EngineConfig, SamplingParams, load_model
from dsv3.data.corpus import read_documents
from dsv3.tokenizer import Tokenizer


def decode(model, tok, prompts, new_tokens, spec):
    engine = Engine(model, tok, EngineConfig(max_num_seqs=len(prompts), speculative_tokens=spec))
    engine.warmup()  # CUDA graphs recorded before the clock starts
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outs, t_dec, n_dec = {}, 0.0, 0  # no device sync per step (see benchmarks/infer/decode.run_ours)
    while engine.has_unfinished():
        pure = all(not s.in_prefill for s in engine.scheduler.running) and not engine.scheduler.waiting
        t = time.perf_counter()
        step = engine.step()
        if pure:
            t_dec += time.perf_counter() - t
            n_dec += sum(len(c.delta_token_ids) for o in step for c in o.outputs)
        outs.update({o.request_id: o.outputs[0].token_ids for o in step if o.finished})
    r = {"decode_tokens_per_s": n_dec / t_dec}
    if spec:
        r |= {"acceptance": engine.accepted / max(engine.drafted, 1),
              "tokens_per_verify_step": 1 + engine.accepted / max(engine.drafted, 1)}
    return r, [outs[i] for i in ids]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint with an MTP module (dsv3 train keeps it by default)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.checkpoint, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if not len(model.mtp):
        sys.exit(f"{args.checkpoint} has no MTP module (num_nextn_predict_layers=0)")
    tok = Tokenizer.from_dir(args.checkpoint)
    text = tok.encode("\n".join(list(read_documents(None))[-40:]))  # the corpus's last documents
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        step = max(1, (len(text) - args.prompt_len) // B)
        prompts = [[tok.bos_id] + text[i * step: i * step + args.prompt_len] for i in range(B)]
        plain, out0 = decode(model, tok, prompts, args.new_tokens, 0)
        spec, out1 = decode(model, tok, prompts, args.new_tokens, 1)
        same = sum(a == b for a, b in zip(out0, out1))
        results[f"batch_{B}"] = {"plain": plain, "mtp": spec, "speedup": spec["decode_tokens_per_s"]
                                 / plain["decode_tokens_per_s"], "identical_outputs": f"{same}/{B}"}
        print(f"batch {B}: {json.dumps(results[f'batch_{B}'])}", flush=True)
    save(__file__, args, results)


if __name__ == "__main__":
    main()
