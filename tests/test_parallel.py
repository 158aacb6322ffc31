"""Data-, expert- and pipeline-parallel training (FSDP2, all-to-all, 1F1B / DualPipeV, and pipeline stages sharded
over data-parallel ranks; gloo on the CPU, 2 and 4 processes) against one process on the same global batch:
`torchrun --nproc-per-node N -m dsv3 train [--ep E] [--pp P]` must give the same losses (MTP's too), gradient
norms, balance biases and weights, and its sharded checkpoint must resume in one process.

The learning rate is small so that the comparison measures the gradients: the two runs sum the same terms in a
different order, and at lr 3e-3 on this tiny MoE the 1e-6 differences grow step by step (Adam's early updates
are about ±lr whatever the gradient's size, and a near-tie in routing flips) to 3e-3 of the loss by step 5."""
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SENTENCES = ["the king speaks to the queen .", "the ghost walks upon the wall .", "a sword lies by the gate .",
             "the queen answers the king .", "night falls on denmark .", "the guard sees the ghost ."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(SENTENCES[(i + j) % 6] for j in range(60)) + "\n")
    common = ["train", "--data", str(corpus), "--vocab-size", "512", "--seq-len", "32", "--batch-size", "8",
              "--micro-batch-size", "4", "--warmup", "2", "--lr", "1e-5", "--eval-every", "4", "--eval-batches",
              "2", "--save-every", "4", "--val-fraction", "0.1", "--threads", "1", "--device", "cpu"]

    def train(out, nproc, *extra):  # nproc 0: plain `dsv3 train`; else torchrun with nproc processes
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-port", str(_free_port()), "-m", "dsv3"] if nproc else [sys.executable, "-m", "dsv3"])
        r = subprocess.run([*launcher, *common, "--out", str(root / out), *extra], capture_output=True, text=True,
                           timeout=600)
        return r

    one = train("one", 0, "--steps", "6")
    assert one.returncode == 0, one.stderr[-3000:]
    tok = ["--tokenizer", str(root / "one" / "tokenizer")]
    runs = {"two": (2,), "ep": (2, "--ep", "2"), "dp-ep": (4, "--ep", "2"), "one-doc": (0, "--doc-mask"),
            "one-mb8": (0, "--micro-batch-size", "8"), "pp-1f1b": (2, "--pp", "2"),
            "pp-dualpipev": (2, "--pp", "2", "--pp-schedule", "dualpipev", "--doc-mask"),
            "pp-dp": (4, "--pp", "2"), "pp-ep-dualpipev": (4, "--pp", "2", "--ep", "2", "--pp-schedule", "dualpipev",
                                "--micro-batch-size", "8")}  # 4 sequences per rank: one per stage of the V
    for name, (nproc, *extra) in runs.items():
        r = train(name, nproc, "--steps", "6", *extra, *tok)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    # The sharded step-4 checkpoints of multi-rank runs (data, expert, pipeline parallel), continued by 1 process.
    for run in ("two", "ep", "pp-dualpipev"):
        shutil.copytree(root / run, root / f"{run}-resumed")
        shutil.rmtree(root / f"{run}-resumed" / "checkpoints" / "step_0000006")
        resumed = train(f"{run}-resumed", 1, "--steps", "6", "--resume", "--ep", "1", "--pp", "1",
                        *[a for a in runs[run] if a == "--doc-mask"], *tok)  # FSDP on 1 rank
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    bad = train("bad", 2, "--steps", "1", "--dp-shard", "3", *tok)
    return root, bad


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def _same_run(run, ref, rel, keys=("loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio")):
    (train1, val1), (train2, val2) = _metrics(ref), _metrics(run)
    assert [r["step"] for r in train2] == list(range(1, 7))
    for a, b in zip(train1, train2):
        for key in keys:  # maxvio: the loads of the global batch
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7 if key != "maxvio" else 1e-3), (a["step"], key)
    assert [v["val_loss"] for v in val2] == pytest.approx([v["val_loss"] for v in val1], rel=rel)
    w1 = load_file(ref / "checkpoints" / "step_0000006" / "model" / "model-00001-of-00001.safetensors")
    w2 = load_file(run / "checkpoints" / "step_0000006" / "model" / "model-00001-of-00001.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        if name.endswith("e_score_correction_bias"):  # integer loads, summed over ranks: the same signs
            assert torch.equal(w1[name], w2[name]), name
        else:
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-5, msg=name)


def test_two_ranks_train_like_one_process(runs):
    root, _ = runs
    _same_run(root / "two", root / "one", rel=1e-5)


@pytest.mark.parametrize("run", ["ep", "dp-ep"])
def test_expert_parallel_ranks_train_like_one_process(runs, run):
    """Experts split over 2 ranks; and over 2 groups of 2 of 4 ranks (each expert on two replicas)."""
    root, _ = runs
    _same_run(root / run, root / "one", rel=1e-5)


@pytest.mark.parametrize("run, ref", [("pp-1f1b", "one"), ("pp-dualpipev", "one-doc"), ("pp-dp", "one"),
                                      ("pp-ep-dualpipev", "one-mb8")])
def test_pipeline_ranks_train_like_one_process(runs, run, ref):
    """2 stages (1F1B), 4 stages in a V (DualPipeV, with document masks), and 2 stages each sharded over 2
    data-parallel ranks (FSDP2; with experts split over them under DualPipeV), MTP on the last stage."""
    root, _ = runs
    _same_run(root / run, root / ref, rel=1e-5)


@pytest.mark.parametrize("run", ["two", "ep", "pp-dualpipev"])
def test_sharded_checkpoint_resumes_in_one_process(runs, run):
    root, _ = runs
    assert sorted(p.name for p in (root / run / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000006"]
    ref = "one-doc" if run == "pp-dualpipev" else "one"
    _same_run(root / f"{run}-resumed", root / ref, rel=1e-5, keys=("loss", "grad_norm"))


def test_bad_layout_is_one_clear_error(runs):
    _, bad = runs
    assert bad.returncode != 0
    assert "--dp-shard 3 does not fit 2 processes with --pp 1" in bad.stderr
    assert bad.stderr.count("does not fit") == 1  # rank 0 says it; the other exits quietly


EP_RANKS = 2


def shard_experts(model: torch.nn.Module, ep: int, ep_rank: int, group=None) -> int:
    """Plain slices instead of DTensors (dsv3.train.parallel.expert_parallel under torchrun): keep this rank's E/ep
    experts of every routed-expert module and route them through EPExperts. -> modules."""
    from dsv3.model.moe import Experts
    from dsv3.train.parallel import EPExperts
    n = 0
    for m in model.modules():
        if type(m) is Experts:
            part = slice(ep_rank * m.gate_up_proj.shape[0] // ep, (ep_rank + 1) * m.gate_up_proj.shape[0] // ep)
            m.gate_up_proj = torch.nn.Parameter(m.gate_up_proj.detach()[part].clone())
            m.down_proj = torch.nn.Parameter(m.down_proj.detach()[part].clone())
            m.__class__, m.ep, m.group = EPExperts, ep, group
            n += 1
    return n


def _ep_worker(rank: int, init_file: str):
    import datetime

    import torch.distributed as dist

    from dsv3.config import preset
    from dsv3.model.moe import Experts
    # A short timeout: a collective that one rank skips is an error here, not a hang.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=EP_RANKS,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_default_dtype(torch.float64)
    cfg = preset("tiny").replace(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3)
    g = torch.Generator().manual_seed(0)
    ref = Experts(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=g)
    N, D = 48, cfg.hidden_size
    x = torch.randn(EP_RANKS * N, D, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(EP_RANKS * N)])
    idx[:20] = torch.tensor([0, 1, 2])  # rank 0's early tokens crowd rank 0's experts; expert 7 gets fewer
    # Then every token on rank 0's experts: rank 1 receives no rows, and must still join the backward's exchanges.
    only_rank0 = torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(EP_RANKS * N)])
    w = torch.rand(EP_RANKS * N, 3, generator=g)
    proj = torch.randn(D, generator=g)

    def run(module, xs, ws, ids):
        module.zero_grad()
        xs, ws = xs.clone().requires_grad_(), ws.clone().requires_grad_()
        y, counts = module(xs, ws, ids)
        (y * proj).sum().backward()
        return y, xs.grad, ws.grad, counts

    ep = Experts(cfg)
    ep.load_state_dict(ref.state_dict())
    assert shard_experts(torch.nn.ModuleList([ep]), EP_RANKS, rank) == 1
    mine = slice(rank * N, (rank + 1) * N)
    experts = slice(rank * 4, (rank + 1) * 4)
    for routing in (idx, only_rank0):
        y_ref, dx_ref, dw_ref, counts_ref = run(ref, x, w, routing)  # one process, the global batch
        y, dx, dw, counts = run(ep, x[mine], w[mine], routing[mine])
        # Node-limited dispatch: each token once per rank holding any of its 3 experts (rank 0's first 20 tokens
        # have all three on rank 0: one row each, not three).
        assert ep.rows_sent == len({(t, int(e) // 4) for t, row in enumerate(routing[mine]) for e in row})
        assert rank or ep.rows_sent <= 2 * N - 20
        torch.testing.assert_close(y, y_ref[mine], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref[mine], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, dw_ref[mine], rtol=1e-12, atol=1e-12)
        # This rank's experts saw every rank's rows: their gradients are the whole batch's (zero on rank 1 when
        # no row reached it).
        torch.testing.assert_close(ep.gate_up_proj.grad, ref.gate_up_proj.grad[experts], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ep.down_proj.grad, ref.down_proj.grad[experts], rtol=1e-12, atol=1e-12)
        dist.all_reduce(counts)
        assert torch.equal(counts, counts_ref)
    dist.destroy_process_group()


def test_expert_parallel_dispatch_and_combine_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ep_worker, args=(str(tmp_path / "init"),), nprocs=EP_RANKS, join=True)


def test_scaling_model_counts_the_rows_epexperts_sends():
    """The scaling model's rows per token (dsv3/train/scaling.py), against the expectation by hand: with one expert
    per rank, a token's K experts are K distinct ranks and its own is among them with probability K/E, whatever the
    routing."""
    from dsv3.train.scaling import rows_per_token

    from dsv3.config import preset
    cfg = preset("bench-684m")  # 64 experts, top-6, group-limited to 4 of 8 groups
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    intra, inter, nodes = rows_per_token(cfg, ep=E, per_node=E)  # one node
    assert abs(intra - K * (E - 1) / E) < 0.01 and inter == nodes == 0
    intra, inter, nodes = rows_per_token(cfg, ep=E, per_node=8)  # 8 nodes = the 8 expert groups
    assert abs(intra + inter - K * (E - 1) / E) < 0.01
    # Node-limited: at most 4 of the 8 nodes, the own one among them 1/8 of the time: ≤ 3.5 others on average
    # (unlimited, 6 experts of 64 would reach 8·(1 − C(56,6)/C(64,6)) · 7/8 = 3.98), often several ranks on one.
    assert 3 < nodes <= cfg.topk_group * 7 / 8 + 0.02 and nodes < inter


def test_clip_grad_norm_is_torchs_on_mixed_dtypes():
    """One process: the same norm and clipped gradients as torch.nn.utils.clip_grad_norm_ (the reference)."""
    from dsv3.train.parallel import clip_grad_norm
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, dtype=dt)) for n, dt in ((5, torch.float32), (7, torch.bfloat16))]
    for p in ours:
        p.grad = torch.randn_like(p) * 3
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ref, ours):
        p.grad = q.grad.clone()
    for max_norm in (100.0, 1.0):  # not clipped, then clipped
        norm = clip_grad_norm(ours, max_norm)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, max_norm).float())
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q.grad, p.grad)


def test_clip_folded_into_fused_adamw_steps_as_clipping_the_gradients():
    """With torch's fused AdamW the clip factor rides on the step (grad_scale): the parameters come out as those of
    torch.nn.utils.clip_grad_norm_ followed by an ordinary AdamW step."""
    from dsv3.train.parallel import clip_grad_norm
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, 3)) for n in (4, 6)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torch.optim.AdamW(ours, lr=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, foreach=False)
    for step, max_norm in enumerate((100.0, 0.5, 0.5)):  # not clipped, then clipped
        for p, q in zip(ref, ours):
            q.grad = torch.randn_like(q) * (step + 1)
            p.grad = q.grad.clone()
        norm = clip_grad_norm(ours, max_norm, optimizer=opt)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, max_norm).float())
        opt.step()
        ref_opt.step()
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_layout_errors_name_what_is_wrong():
    from dsv3.train.config import TrainConfig
    from dsv3.train.parallel import layout_errors
    assert layout_errors(TrainConfig(batch_size=8), 4, 8) == []
    assert layout_errors(TrainConfig(batch_size=8, ep=4), 4, 8) == []
    assert layout_errors(TrainConfig(batch_size=8, pp=2, ep=2), 4, 8) == []  # 2 stages x 2 data-parallel ranks
    assert "--ep 3 does not divide the 4 data-parallel ranks" in layout_errors(TrainConfig(batch_size=8, ep=3), 4,
                                                                              8)[0]
    assert "--ep 4 does not divide the 2 data-parallel ranks (world size 4 / --pp 2)" in layout_errors(
        TrainConfig(batch_size=8, pp=2, ep=4), 4, 8)[0]
    assert "n_routed_experts=6" in layout_errors(TrainConfig(batch_size=8, ep=4), 4, 6)[0]
    assert "multiples of the 4 data-parallel ranks" in layout_errors(TrainConfig(batch_size=6), 4, 8)[0]
    assert "--pp 3 does not divide the world size 4" in layout_errors(TrainConfig(batch_size=8, pp=3), 4, 8)[0]
    assert "the model's 4 layers cannot fill 8 pipeline stages (--pp 4 --pp-schedule dualpipev: two stages per " \
        "rank)" in layout_errors(TrainConfig(batch_size=8, pp=4, pp_schedule="dualpipev"), 4, 8, n_layers=4)[0]
    assert "4 sequences of a micro-batch must split into 8 pipeline micro-batches" in layout_errors(
        TrainConfig(batch_size=8, pp=2, pp_microbatches=8), 4, 8)[0]
    assert "--fp8-experts" in layout_errors(TrainConfig(batch_size=8, ep=2, precision="fp8", fp8_experts=True),
                                            2, 8)[0]


def _pp_worker(rank: int, init_file: str, schedule: str):
    import torch.distributed as dist

    from dsv3.config import preset
    from dsv3.model import Transformer
    from dsv3.train.objective import mtp_loss, next_token_loss, set_balance_loss
    from dsv3.train.pipeline import build_schedule
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    cfg = preset("tiny")  # with one MTP module, on the last stage
    model = Transformer(cfg)
    model.init_weights(std=0.02)
    ids = torch.randint(cfg.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def loss_fn(out, target):  # main + 0.3 MTP, as the trainer's
        return next_token_loss(out[0], target) + 0.3 * mtp_loss(list(out[1:]), target)

    # One process over the whole batch: the reference loss, gradients and expert loads.
    set_balance_loss(model, 1e-2)
    out = model(inputs, mtp=True)
    ref_loss = next_token_loss(out.logits, labels) + 0.3 * mtp_loss(out.mtp_logits, labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_counts = out.expert_counts
    model.zero_grad()
    # The same model cut into stages; 4 micro-batches of 2 sequences.
    sched, stages = build_schedule(model, rank, 2, 4, loss_fn, schedule, torch.device("cpu"))
    holds = {n for m in stages for n, _ in m.named_parameters()}
    first, last = rank == 0, rank == 1 if schedule == "1f1b" else rank == 0
    losses = []
    sched.step(*([inputs] if first else []), **({"target": labels, "losses": losses} if last else {}))
    if last:
        assert torch.stack(losses).mean().item() == pytest.approx(ref_loss.item(), rel=1e-6)
    names = dict(model.named_parameters())
    for m in stages:
        for n, p in m.named_parameters():  # the embedding: the main path's and MTP's gradients, summed
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
        # layer-wise loads summed over the micro-batches = the loads of the whole batch (MTP's in the last row)
        got = m.take_loads(4)[0]
        for row, i in enumerate(m.moe_rows):
            assert torch.equal(got[row], ref_counts[i]), i
    assert holds and all(n in names for n in holds)
    sizes = [torch.tensor(len(holds))]
    dist.all_reduce(sizes[0])
    assert sizes[0].item() == len(names)  # every parameter lives on exactly one rank
    dist.destroy_process_group()


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_pipeline_schedules_match_one_process(tmp_path, schedule):
    import torch.multiprocessing as mp
    mp.spawn(_pp_worker, args=(str(tmp_path / "init"), schedule), nprocs=2, join=True)


def test_pipeline_stage_bounds_and_errors():
    from dsv3.config import preset
    from dsv3.model import Transformer
    from dsv3.train.pipeline import build_schedule, stage_bounds
    assert stage_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert stage_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        stage_bounds(3, 4)
    model = Transformer(preset("tiny"))
    with pytest.raises(ValueError, match="2 micro-batches for 4 stages"):
        build_schedule(model, 0, 2, 2, None, "dualpipev", torch.device("cpu"))
    with pytest.raises(ValueError, match="expected 1f1b or dualpipev"):
        build_schedule(model, 0, 2, 4, None, "gpipe", torch.device("cpu"))
