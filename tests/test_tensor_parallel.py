"""Tensor-parallel inference (dsv3/infer/tensor_parallel.py, docs/inference.md#tensor-parallel-layout): 2 and 4 gloo
ranks each holding their shard of a tiny DeepSeek-V3 (group-limited routing, dense and MoE layers, MTP) give the
logits one process gives with the whole model, and the engine on them the same greedy tokens over a continuous
batch of mixed lengths with chunked prefill and a prefix-cache hit, with and without MTP drafts. One process group per world size runs every
scenario; each rank first computes the one-process reference on a copy of the whole model."""
import copy
import datetime

import torch
import torch.multiprocessing as mp

from conftest import small_v3

CFG = {"model_type": "deepseek_v3", **small_v3(num_attention_heads=8, num_key_value_heads=8, vocab_size=576),
       "num_nextn_predict_layers": 1}


def _generate(model, tok, spec: int = 0) -> dict:
    from dsv3 import Engine, EngineConfig, SamplingParams
    engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, max_batched_tokens=32,
                                             speculative_tokens=spec))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 560, (n,), generator=g).tolist() for n in (5, 40, 17)]
    prompts.append(prompts[1][:36] + [7, 8])  # shares two 16-token blocks with the 40-token prompt
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True))
    out, cached = {}, 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
                cached += o.num_cached_tokens
    return {"tokens": out, "cached": cached}


def _worker(rank: int, world: int, init_file: str, queue):
    import torch.distributed as dist

    from dsv3 import ModelConfig
    from dsv3.data.bpe import train_bpe
    from dsv3.data.corpus import read_documents
    from dsv3.infer.tensor_parallel import apply_tp
    from dsv3.io.hf import build_model
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a skipped collective fails, never hangs
    tok = train_bpe(list(read_documents(None))[:20], 512)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(CFG), device="cpu")
    model.init_weights()
    with torch.no_grad():
        for m in model.modules():  # routing biases that matter, so group-limited routing is exercised
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.05)
    model.eval()
    ids = torch.randint(0, 576, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, mtp=True)
    ref_engine = _generate(copy.deepcopy(model), tok)
    apply_tp(model)
    with torch.no_grad():
        out = model(ids, mtp=True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    sizes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    queue.put((rank, rel(out.logits, ref.logits), rel(out.mtp_logits[0], ref.mtp_logits[0]), sizes, ref_engine,
               _generate(model, tok), _generate(model, tok, spec=1)))
    dist.destroy_process_group()


def test_2_and_4_ranks_give_one_process_logits_and_tokens(tmp_path):
    for world in (2, 4):
        queue = mp.get_context("spawn").Queue()
        mp.start_processes(_worker, args=(world, str(tmp_path / f"init{world}"), queue), nprocs=world, join=True,
                           start_method="spawn")
        for rank, main, mtp, sizes, ref_engine, engine, drafted in sorted(queue.get() for _ in range(world)):
            assert main < 1e-5 and mtp < 1e-5, (world, rank, main, mtp)
            assert engine["tokens"] == ref_engine["tokens"] and len(engine["tokens"]) == 4, (world, rank)
            assert drafted["tokens"] == ref_engine["tokens"], (world, rank)  # MTP drafts: greedy stays exact
            assert engine["cached"] == ref_engine["cached"] > 0  # a prefix-cache hit, the same sharded
            # each rank holds its share: 8/world experts and heads, 576/world vocabulary rows, 96/world MLP columns
            assert sizes["layers.1.mlp.experts.gate_up_proj"][0] == 8 // world
            assert sizes["embed_tokens.weight"][0] == 576 // world
            assert sizes["layers.0.self_attn.o_proj.weight"][1] == 8 * 12 // world
            assert sizes["layers.0.mlp.down_proj.weight"][1] == 96 // world
