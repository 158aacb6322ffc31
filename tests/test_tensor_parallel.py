"""Tensor-parallel inference (dsv3/infer/tensor_parallel.py, docs/inference.md#tensor-parallel-layout): 2 and 4 gloo
ranks each holding their shard of a tiny DeepSeek-V3 (group-limited routing, dense and MoE layers, MTP) give the
logits one process gives with the whole model, and the engine on them the same greedy tokens over a continuous
batch of mixed lengths with chunked prefill and a prefix-cache hit, with and without MTP drafts; and the same with
FP8 weights (scale grids cut with their weights, 128-block boundaries). One process group per world size runs every
scenario; each rank first computes the one-process reference on a copy of the whole model."""
import copy
import datetime
import os

import torch
import torch.multiprocessing as mp

from conftest import small_v3

CFG = {"model_type": "deepseek_v3", **small_v3(num_attention_heads=8, num_key_value_heads=8, vocab_size=576),
       "num_nextn_predict_layers": 1}
# With FP8 weights every split dimension is 512 wide: 128 (one scale block) per rank at 4 ranks.
FP8_CFG = {**CFG, **small_v3(hidden_size=256, intermediate_size=512, moe_intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                             qk_rope_head_dim=64, v_head_dim=128, vocab_size=576)}


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


def _model(cfg: dict, fp8: bool):
    from dsv3 import ModelConfig
    from dsv3.fp8 import fp8_weights
    from dsv3.io.hf import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(cfg), device="cpu")
    model.init_weights()
    with torch.no_grad():
        for m in model.modules():  # routing biases that matter, so group-limited routing is exercised
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.05)
    if fp8:
        fp8_weights(model)
    return model.eval()


def _worker(rank: int, world: int, init_file: str, queue):
    import torch.distributed as dist

    from dsv3.data.bpe import train_bpe
    from dsv3.data.corpus import read_documents
    from dsv3.infer.tensor_parallel import apply_tp
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a skipped collective fails, never hangs
    tok = train_bpe(list(read_documents(None))[:20], 512)
    ids = torch.randint(0, 576, (2, 24), generator=torch.Generator().manual_seed(1))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    results = [rank]
    for cfg, fp8 in ((CFG, False), (FP8_CFG, True)):
        model = _model(cfg, fp8)
        with torch.no_grad():
            ref = model(ids, mtp=True)
        ref_engine = _generate(copy.deepcopy(model), tok)
        apply_tp(model)
        with torch.no_grad():
            out = model(ids, mtp=True)
        sizes = {n: tuple(p.shape) for n, p in (*model.named_parameters(), *model.named_buffers())}
        results.append((rel(out.logits, ref.logits), rel(out.mtp_logits[0], ref.mtp_logits[0]), sizes, ref_engine,
                        _generate(model, tok), _generate(model, tok, spec=1)))
    queue.put(tuple(results))
    dist.destroy_process_group()


def test_2_and_4_ranks_give_one_process_logits_and_tokens(tmp_path):
    for world in (2, 4):
        queue = mp.get_context("spawn").Queue()
        mp.start_processes(_worker, args=(world, str(tmp_path / f"init{world}"), queue), nprocs=world, join=True,
                           start_method="spawn")
        for rank, bf16, fp8 in sorted(queue.get() for _ in range(world)):
            for kind, (main, mtp, sizes, ref_engine, engine, drafted) in (("bf16", bf16), ("fp8", fp8)):
                assert main < 1e-5 and mtp < 1e-5, (world, rank, kind, main, mtp)
                assert engine["tokens"] == ref_engine["tokens"] and len(engine["tokens"]) == 4, (world, rank, kind)
                assert drafted["tokens"] == ref_engine["tokens"], (world, rank)  # MTP drafts: greedy stays exact
                assert engine["cached"] == ref_engine["cached"] > 0  # a prefix-cache hit, the same sharded
                assert sizes["layers.1.mlp.experts.gate_up_proj"][0] == 8 // world  # its share of experts
                assert sizes["embed_tokens.weight"][0] == 576 // world  # of the vocabulary
            # bf16: o_proj's 8 heads × 12 and the dense MLP's 96 columns split; FP8: the scale grids with them
            assert bf16[2]["layers.0.self_attn.o_proj.weight"][1] == 8 * 12 // world
            assert bf16[2]["layers.0.mlp.down_proj.weight"][1] == 96 // world
            assert fp8[2]["layers.0.self_attn.o_proj.weight_scale_inv"] == (2, 4 // world)
            assert fp8[2]["layers.0.self_attn.q_b_proj.weight_scale_inv"] == (4 // world, 1)
            assert fp8[2]["layers.1.mlp.experts.down_proj_scale_inv"] == (8 // world, 2, 4)


def test_llm_with_tensor_parallel_size_2_generates_what_one_process_does(tmp_path):
    from dsv3 import LLM, SamplingParams, save_model
    from dsv3.data.bpe import train_bpe
    from dsv3.data.corpus import read_documents
    ckpt = tmp_path / "ckpt"
    save_model(_model(CFG, fp8=False), ckpt)
    train_bpe(list(read_documents(None))[:20], 512).save(ckpt)
    prompts = ["ROMEO.\n", "JULIET. O Romeo, Romeo", "A"]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.8, seed=5, max_tokens=9),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]
    one = [o.outputs[0].token_ids for o in LLM(ckpt, device="cpu").generate(prompts, params, use_tqdm=False)]
    llm = LLM(ckpt, device="cpu", tensor_parallel_size=2)
    workers = list(llm._workers)  # rank 1's process
    try:
        two = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params[:1], use_tqdm=False)]
    finally:
        llm.close()
    assert two == one and again == one[:1]
    assert len(workers) == 1 and not workers[0].is_alive() and workers[0].exitcode == 0  # close() ended rank 1
    assert not os.path.exists(llm._rendezvous)  # and removed the group's file store
