"""Tensor-parallel inference (dsv3/infer/tensor_parallel.py, docs/inference.md#tensor-parallel-layout): 2 and 4 gloo
ranks each holding their shard of a tiny DeepSeek-V3 (group-limited routing, dense and MoE layers, MTP) give the
logits one process gives with the whole model."""
import datetime

import torch
import torch.multiprocessing as mp

from conftest import small_v3


def _worker(rank: int, world: int, init_file: str, cfg_dict: dict, queue):
    import torch.distributed as dist

    from dsv3 import ModelConfig
    from dsv3.infer.tensor_parallel import apply_tp
    from dsv3.io.hf import build_model
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a skipped collective fails, never hangs
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf_dict(cfg_dict), device="cpu")
    model.init_weights()
    with torch.no_grad():
        for m in model.modules():  # routing biases that matter, so group-limited routing is exercised
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.05)
    model.eval()
    ids = torch.randint(0, cfg_dict["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, mtp=True)
        apply_tp(model)
        out = model(ids, mtp=True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    sizes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    queue.put((rank, rel(out.logits, ref.logits), rel(out.mtp_logits[0], ref.mtp_logits[0]),
               torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1)), sizes))
    dist.destroy_process_group()


def test_2_and_4_ranks_give_one_process_logits(tmp_path):
    cfg = {"model_type": "deepseek_v3", **small_v3(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8,
                                                  n_routed_experts=8, vocab_size=320), "num_nextn_predict_layers": 1}
    ctx = mp.get_context("spawn")
    for world in (2, 4):
        queue = ctx.Queue()
        mp.start_processes(_worker, args=(world, str(tmp_path / f"init{world}"), cfg, queue), nprocs=world,
                           join=True, start_method="spawn")
        results = sorted(queue.get() for _ in range(world))
        for rank, main, mtp, same_argmax, sizes in results:
            assert main < 1e-5 and mtp < 1e-5 and same_argmax, (world, rank, main, mtp)
            # each rank holds its share: 8/world heads' q_b rows, 8/world experts, 320/world vocabulary rows
            assert sizes["layers.1.mlp.experts.gate_up_proj"][0] == 8 // world
            assert sizes["embed_tokens.weight"][0] == 320 // world
            assert sizes["layers.0.self_attn.o_proj.weight"][1] == 8 * 12 // world
            assert sizes["layers.0.mlp.down_proj.weight"][1] == 96 // world
