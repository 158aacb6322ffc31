"""`LLM`: batch offline generation, the form users know from vLLM.

    from dsv3 import LLM, SamplingParams
    llm = LLM("runs/quickstart/checkpoints/step_0000960/model")
    for out in llm.generate(["ROMEO.\\n", "JULIET.\\n"], SamplingParams(temperature=0.8, max_tokens=64)):
        print(out.outputs[0].text)

`LLM(path, tensor_parallel_size=N)` starts N-1 more processes itself; each rank loads the checkpoint, keeps its
shard (dsv3/infer/tensor_parallel.py) and runs an engine in lockstep with this one (rank 0). `close()` ends them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from dsv3 import fp8
from dsv3.infer import tensor_parallel as tp
from dsv3.infer.engine import Engine, EngineConfig, RequestOutput
from dsv3.infer.sampler import SamplingParams
from dsv3.io import load_model
from dsv3.model import Transformer
from dsv3.options import check, option
from dsv3.runtime import device_option, resolve_device
from dsv3.tokenizer import Tokenizer


@dataclass(slots=True)
class LoadConfig:
    """How the inference verbs (generate, chat, serve, eval) load a checkpoint."""
    device: str = device_option()
    dtype: str | None = option(None, choices=("bfloat16", "float32"), unset="bfloat16 on a GPU, float32 on a CPU",
                               help="dtype of the weights and activations")
    fp8_weights: bool = option(False, help="decoder weights in FP8 (e4m3, 128x128 block scales): half the memory "
                                           "(on a CPU: far slower)")

    def __post_init__(self):
        check(self)


def inference_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """--dtype (a name or a torch.dtype); by default bf16 on a GPU, fp32 on a CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name) if isinstance(name, str) else name


class LLM:
    def __init__(self, model: str | Path | Transformer, tokenizer: str | Path | Tokenizer | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 config: EngineConfig | None = None, fp8_weights: bool = False, tensor_parallel_size: int = 1):
        """A checkpoint directory (HF layout, with its tokenizer files) or a built model plus a tokenizer.
        `fp8_weights`: the decoder's linears and routed experts held and multiplied in FP8
        (dsv3/fp8/inference.py; an FP8 checkpoint's values as they are, a built model converted in place).
        `tensor_parallel_size`: N processes on N devices (gloo on a CPU, NCCL on GPUs), from a checkpoint."""
        self._workers = []
        if tensor_parallel_size > 1:
            if isinstance(model, Transformer):
                raise ValueError("tensor_parallel_size > 1 needs a checkpoint directory: every rank loads it")
            self._workers, self._rendezvous, engine = _start_ranks(tensor_parallel_size, str(model),
                                                                   str(tokenizer or model), device, dtype,
                                                                   fp8_weights, config)
            self.tokenizer, self.engine = engine.tokenizer, tp.TPEngine(engine)
            return
        device = resolve_device(device)
        if isinstance(model, Transformer):
            if tokenizer is None:
                raise ValueError("a Transformer instance needs its tokenizer (a directory or a Tokenizer)")
            if fp8_weights:  # a built model: converted in place
                fp8.fp8_weights(model)
        else:
            tokenizer = tokenizer or model
            model = load_model(model, device=device, dtype=inference_dtype(dtype, device), fp8_weights=fp8_weights)
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_dir(tokenizer)
        self.engine = Engine(model, self.tokenizer, config)

    @classmethod
    def from_config(cls, checkpoint: str | Path, load: LoadConfig) -> LLM:
        """A checkpoint loaded as the inference verbs' flags say."""
        return cls(checkpoint, device=load.device, dtype=load.dtype, fp8_weights=load.fp8_weights)

    def close(self) -> None:
        """With tensor parallelism, end the other ranks' processes (idempotent)."""
        if self._workers:
            self.engine.close()
            for w in self._workers:
                w.join(60)
            self._workers = []
            dist.destroy_process_group()
            shutil.rmtree(self._rendezvous, ignore_errors=True)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in prompt order (`.outputs[i].text`, `.token_ids`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        return run_requests(self.engine, prompts, params, use_tqdm)


def _shard(rank: int, n: int, init_file: str, model: str, tokenizer: str, device, dtype, fp8_weights: bool,
           config: EngineConfig | None) -> Engine:
    """Join the group as `rank` of `n`, load the checkpoint, keep this rank's shard, build its engine."""
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=n)
    shard = tp.apply_tp(load_model(model, device=device, dtype=inference_dtype(dtype, device),
                                   fp8_weights=fp8_weights))
    return Engine(shard, Tokenizer.from_dir(tokenizer), config)


def _follower(rank: int, *args) -> None:
    tp.follow(_shard(rank, *args))
    dist.destroy_process_group()


def _start_ranks(n: int, *args) -> tuple[list, str, Engine]:
    """Ranks 1..n-1 as processes of their own (spawned: a fresh interpreter each), then rank 0 here."""
    # The group's file store: a file that must not exist yet, kept while the group lives (LLM.close removes it).
    init_file = str(Path(tempfile.mkdtemp(prefix="dsv3-tp-")) / "init")
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_follower, args=(rank, n, init_file, *args), daemon=True) for rank in range(1, n)]
    for w in workers:
        w.start()
    return workers, str(Path(init_file).parent), _shard(0, n, init_file, *args)


def run_requests(engine: Engine, prompts: list, params: list[SamplingParams], use_tqdm: bool = True,
                 desc: str = "generating") -> list[RequestOutput]:
    """Run the prompts through the engine to the end -> their finished RequestOutputs, in prompt order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done: dict[str, RequestOutput] = {}
    bar = tqdm(total=len(ids), desc=desc, unit="req", disable=not use_tqdm)
    n_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            n_tokens += sum(len(c.delta_token_ids) for c in out.outputs)
            if out.finished:
                done[out.request_id] = out
                bar.update(1)
        bar.set_postfix(tok_s=f"{n_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f}", refresh=False)
    bar.close()
    return [done[i] for i in ids]
