"""`dsv3 generate CKPT`: complete a prompt (or fill in the middle) from the command line, streaming the text."""
from __future__ import annotations

import argparse
import json
import sys

from dsv3.infer.llm import LLM, LoadConfig
from dsv3.infer.sampler import SamplingParams
from dsv3.options import add_flags, from_args
from dsv3.tokenizer import fim_prompt


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--max-tokens", type=int, default=256, help="new tokens at most (default 256)")
    a("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    a("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    a("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top probability")
    a("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating prompt/output tokens")
    a("--frequency-penalty", type=float, default=0.0, help="OpenAI-style, per occurrence in the output")
    a("--presence-penalty", type=float, default=0.0, help="OpenAI-style, once per token present in the output")
    a("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    a("--seed", type=int, help="seed for reproducible sampling")
    a("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def params_from_args(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          stop=args.stop, seed=args.seed, ignore_eos=args.ignore_eos)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face layout with tokenizer files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--prompt-file", help="file whose text to continue")
    src.add_argument("--fim-prefix", help="fill in the middle: the code before the hole (with --fim-suffix)")
    p.add_argument("--fim-suffix", default="", help="fill in the middle: the code after the hole")
    add_flags(p, LoadConfig)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_sampling_args(p)


def run(args) -> None:
    if args.fim_prefix is not None:
        prompt = fim_prompt(args.fim_prefix, args.fim_suffix)
    elif args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    llm = LLM.from_config(args.checkpoint, from_args(LoadConfig, args))
    engine = llm.engine
    rid = engine.add_request(prompt, params_from_args(args))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if not args.json:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
            final = out if out.finished else final
    c = final.outputs[0]
    if args.json:
        print(json.dumps({"id": rid, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                          "prompt_tokens": len(final.prompt_token_ids), "cached_tokens": final.num_cached_tokens}))
    else:
        print()
