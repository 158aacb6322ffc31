"""Offline throughput in the shape of nano-vllm's `bench.py`: 256 sequences of random token ids, input and output
lengths uniform in [100, 1024], temperature 0.6, EOS ignored; one `LLM.generate` call timed after a warm-up;
throughput = output tokens / seconds.

  python -m benchmarks.infer.throughput --preset bench-684m        # an H100 (random bf16 weights)
  python -m benchmarks.infer.throughput --preset tiny --num-seqs 16 --max-len 128   # CPU smoke run
Results: docs/inference.md#decode-speed; saved as benchmarks/results/infer/throughput-<preset>_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from benchmarks.results import save
from dsv3 import LLM, EngineConfig, SamplingParams, preset
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents
from dsv3.io.hf import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-684m")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt and longest output")
    p.add_argument("--max-batched-tokens", type=int, default=16384, help="nano-vllm's default budget")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(preset(args.preset).replace(num_nextn_predict_layers=0), device, dtype)
    model.init_weights()
    tok = train_bpe(read_documents(None), 1024)  # detokenization only: prompts are random ids
    llm = LLM(model.eval(), tok, config=EngineConfig(max_num_seqs=args.num_seqs,
                                                     max_batched_tokens=args.max_batched_tokens))
    rng = random.Random(0)
    prompts = [[rng.randint(0, min(10000, model.config.vocab_size - 1))
                for _ in range(rng.randint(args.min_len, args.max_len))] for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(args.min_len, args.max_len))
              for _ in range(args.num_seqs)]
    llm.engine.warmup()
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    expected = sum(sp.max_tokens for sp in params)
    if produced != expected:
        sys.exit(f"generated {produced} tokens, expected {expected}")
    r = {"output_tokens": produced, "prompt_tokens": sum(map(len, prompts)), "seconds": seconds,
         "output_tokens_per_s": produced / seconds, "preemptions": llm.engine.scheduler.preemptions,
         "kv_blocks": llm.engine.pool.num_blocks}
    print(f"| {args.preset} | {args.num_seqs} seqs | {produced} output tokens | {seconds:.2f} s | "
          f"{produced / seconds:,.0f} tok/s |")
    save(__file__, args, r, tag=args.preset)


if __name__ == "__main__":
    main()
