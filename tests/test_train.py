"""Pretraining: the objective against hand-computed cases (docs/architecture.md#multi-token-prediction,
#auxiliary-loss-free-balancing), a loss that falls, bit-exact resume,
and the errors a user can run into."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import dsv3
from dsv3.train.checkpoint import checkpoints
from dsv3.train.config import TrainConfig
from dsv3.train.loop import Trainer
from dsv3.train.objective import max_violation, mtp_loss, update_balance_bias
from dsv3.train.optim import lr_at


def test_bias_update_matches_the_rule_on_hand_computed_loads(tiny_cfg):
    model = dsv3.Transformer(tiny_cfg)
    model.init_buffers()
    E = tiny_cfg.n_routed_experts  # 8 experts; layers: 2 MoE + 1 MTP
    counts = torch.tensor([[5, 1, 2, 2, 2, 2, 2, 0], [2] * 8, [0, 0, 0, 0, 0, 0, 0, 16]])
    update_balance_bias(model, counts, rate=0.01)
    biases = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    # mean load 2: overloaded experts go down by γ, underloaded up by γ, balanced ones stay.
    assert biases[0].tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
    assert biases[1].tolist() == [0.0] * E
    assert biases[2].tolist() == pytest.approx([0.01] * 7 + [-0.01])
    assert max_violation(counts).tolist() == pytest.approx([1.5, 0.0, 7.0])


def test_mtp_loss_matches_the_paper_on_a_hand_computed_case():
    # B=1, T=3, V=2, D=1: depth-1 logits at positions 0, 1 predict labels[1], labels[2]; normalised by T=3.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, 0, 1]])
    # pos 0 -> target labels[1] = 0 with logits (0, 0): −log 1/2; pos 1 -> target labels[2] = 1 with (1, 0):
    # −log(1 / (e + 1)) = log(e + 1).
    expected = (math.log(2) + math.log(math.e + 1)) / 3
    assert mtp_loss([logits], labels).item() == pytest.approx(expected, rel=1e-6)


def test_lr_schedules():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    cfg = cfg.optim, cfg.steps
    assert lr_at(0, *cfg) == pytest.approx(0.1) and lr_at(9, *cfg) == pytest.approx(1.0)
    assert lr_at(10, *cfg) == pytest.approx(1.0) and lr_at(100, *cfg) == pytest.approx(0.1)
    assert lr_at(55, *cfg) == pytest.approx(0.55)  # cosine midpoint between peak and floor
    wsd = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    wsd = wsd.optim, wsd.steps
    assert lr_at(79, *wsd) == 1.0 and lr_at(90, *wsd) == pytest.approx(0.55) and lr_at(100, *wsd) == pytest.approx(0.1)


def _corpus(tmp_path):
    # Text with structure to learn (a fixed cycle of sentences, each document starting elsewhere in it), so the
    # model can beat the unigram baseline quickly; independent random words could not.
    sentences = ["the king speaks to the queen .", "the ghost walks upon the wall .", "a sword lies by the gate .",
                 "the queen answers the king .", "night falls on denmark .", "the guard sees the ghost ."]
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        lines = [sentences[(i + j) % len(sentences)] for j in range(60)]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return d


def _cfg(tmp_path, out="run", **kw):
    base = dict(data=[str(_corpus(tmp_path)) if not (tmp_path / "corpus").exists() else str(tmp_path / "corpus")],
                out=str(tmp_path / out), vocab_size=512, seq_len=32, batch_size=4, micro_batch_size=2, steps=12,
                warmup=3, lr=3e-3, eval_every=6, eval_batches=2, save_every=6, val_fraction=0.1, threads=2)
    base.update(kw)
    return TrainConfig(**base)


def test_short_run_loss_decreases_and_writes_everything(tmp_path):
    summary = Trainer(_cfg(tmp_path, steps=40, save_every=20, eval_every=20, profile_steps=2)).run()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 40 and {"loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s",
                                 "maxvio"} <= set(train[0])
    assert [r["step"] for r in train if r.get("profiled")] == [39, 40]
    (rank,) = next(r["ranks"] for r in rows if "ranks" in r)  # the profile of the last 2 steps, peak memory
    assert 0 < rank["compute_ms"] <= 2 * rank["step_ms"] and rank["nccl_sendrecv_ms"] == 0 and rank["peak_rss_gib"] > 0
    assert sum(r["loss"] for r in train[-5:]) < 0.7 * sum(r["loss"] for r in train[:5])
    assert summary["val_loss"] < summary["unigram_loss"]
    model = dsv3.load_model(summary["checkpoint"])  # the exported checkpoint is a plain HF-layout model
    assert model.config.num_nextn_predict_layers == 1
    assert (tmp_path / "run/plot.png").stat().st_size > 10_000
    assert len(checkpoints(tmp_path / "run")) == 2


def test_resume_continues_bit_for_bit(tmp_path):
    Trainer(_cfg(tmp_path, out="straight")).run()
    first = Trainer(_cfg(tmp_path, out="split"))
    for _ in range(6):
        first.log.write(first.train_step())
    first.save()
    first.log.close()
    Trainer(_cfg(tmp_path, out="split", resume=True)).run()
    losses = {}
    for name in ("straight", "split"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["loss"], r["mtp_loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(losses["split"]) == 12 and losses["split"] == losses["straight"]


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, save_every=100))
    real_step = trainer.train_step

    def step():
        if trainer.step == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(SystemExit) as e:
        trainer.run()
    assert e.value.code == 130
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step_0000004"]


def test_num_layers_shapes_a_new_model(tmp_path):
    tr = Trainer(_cfg(tmp_path, num_layers=2, steps=1))
    assert len(tr.model.layers) == 2 and tr.model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="num_layers=2 shapes a new model"):
        _cfg(tmp_path, out="other", num_layers=2, init_from=str(tmp_path))


def test_resume_refuses_another_architecture(tmp_path):
    Trainer(_cfg(tmp_path, steps=6)).run()
    with pytest.raises(ValueError, match="another architecture.*num_nextn_predict_layers"):
        Trainer(_cfg(tmp_path, steps=12, resume=True, mtp=False))


def test_existing_run_is_never_overwritten(tmp_path):
    Trainer(_cfg(tmp_path, steps=6)).run()
    before = (tmp_path / "run/metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(_cfg(tmp_path, steps=6))
    assert (tmp_path / "run/metrics.jsonl").read_text() == before


def test_bad_input_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text found"):
        Trainer(_cfg(tmp_path, data=[str(tmp_path / "empty.txt")]))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Trainer(_cfg(tmp_path, out="r2", data=[str(tmp_path / "nope.txt")]))
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="--balance bias needs .*topk_method='greedy'"):
        Trainer(_cfg(tmp_path, out="r3", preset="deepseek-v2-lite", balance="bias"))
    r = subprocess.run([sys.executable, "-m", "dsv3", "train", "--bogus-flag"], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --bogus-flag" in r.stderr


def test_training_on_token_files_built_by_another_run(tmp_path):
    first = Trainer(_cfg(tmp_path, steps=6))
    first.run()
    run = tmp_path / "run"
    # Carried elsewhere without the corpus: the token files and the tokenizer are all a run needs.
    again = Trainer(_cfg(tmp_path, out="again", steps=6, data=[str(run / "data")], tokenizer=str(run / "tokenizer")))
    assert np.array_equal(again.train_tokens.tokens, first.train_tokens.tokens)
    assert np.array_equal(again.val_tokens.tokens, first.val_tokens.tokens)
    again.run()
    with pytest.raises(ValueError, match="holds token files: pass the tokenizer"):
        Trainer(_cfg(tmp_path, out="r2", data=[str(run / "data")]))
    (tmp_path / "digits").mkdir()
    for i in range(10):
        (tmp_path / "digits" / f"{i}.txt").write_text(" ".join(str(j * j + i) for j in range(300)))
    Trainer(_cfg(tmp_path, out="other", steps=1, data=[str(tmp_path / "digits")]))
    with pytest.raises(ValueError, match="built with another tokenizer"):
        Trainer(_cfg(tmp_path, out="r3", data=[str(run / "data")], tokenizer=str(tmp_path / "other" / "tokenizer")))


def test_fp8_precision_trains_and_saves_a_plain_checkpoint(tmp_path):
    summary = Trainer(_cfg(tmp_path, steps=12, precision="fp8", fp8_experts=True, fp8_min_dim=0)).run()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert sum(r["loss"] for r in train[-3:]) < 0.8 * sum(r["loss"] for r in train[:3])
    model = dsv3.load_model(summary["checkpoint"])  # no FP8 classes, no extra keys: a plain model
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_bf16_moments_adamw_follows_the_adamw_rule_with_rounded_moments():
    from dsv3.train.optim import AdamWBF16Moments
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 32, generator=g)
    grads = [torch.randn(64, 32, generator=g) * (0.1 + i) for i in range(6)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    p = torch.nn.Parameter(p0.clone())
    opt = AdamWBF16Moments([{"params": [p], "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    ref, m, v = p0.double(), torch.zeros(64, 32), torch.zeros(64, 32)
    for t, grad in enumerate(grads, 1):
        p.grad = grad.clone()
        opt.step()
        m_new = m * b1 + (1 - b1) * grad  # the rule, with the stored moments rounded to bf16 after each step
        v_new = v * b2 + (1 - b2) * grad * grad
        ref = ref * (1 - lr * wd) - lr / (1 - b1 ** t) * m_new.double() / (
            (v_new.double() / (1 - b2 ** t)).sqrt() + eps)
        m, v = m_new.bfloat16().float(), v_new.bfloat16().float()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert ((p.detach().double() - ref).abs().max() / (ref - p0.double()).abs().max()) < 1e-4
    q = torch.nn.Parameter(p0.clone())  # and it stays close to torch's AdamW with fp32 moments
    torch_opt = torch.optim.AdamW([q], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for grad in grads:
        q.grad = grad.clone()
        torch_opt.step()
    assert ((p - q).abs().max() / (q - p0).abs().max()).item() < 0.02


def test_bf16_moments_in_a_training_run(tmp_path):
    trainer = Trainer(_cfg(tmp_path, steps=12, moments_dtype="bf16"))
    trainer.run()
    states = list(trainer.opt.state.values())
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert sum(r["loss"] for r in train[-3:]) < 0.8 * sum(r["loss"] for r in train[:3])
    Trainer(_cfg(tmp_path, steps=14, moments_dtype="bf16", resume=True)).run()  # its state saves and loads


def test_metrics_log_starts_fresh_unless_resuming(tmp_path):
    """A second SFT / GRPO / train run in the same directory must not plot the first run's curve with its own."""
    from dsv3.train.metrics import MetricsLog
    path = tmp_path / "metrics.jsonl"
    for _ in range(2):
        log = MetricsLog(path)
        for step in range(3):
            log.write({"step": step})
        log.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    log = MetricsLog(path, resume_step=1)  # resuming from step 1: its later lines go, new ones follow
    log.write({"step": 2, "resumed": True})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 0}, {"step": 1},
                                                                      {"step": 2, "resumed": True}]


def test_peak_flops_knows_datasheet_gpus_and_nothing_else(monkeypatch):
    """MFU's denominator: NVIDIA's dense BF16 tensor-core peaks (half the datasheets' sparsity figures); a GPU
    missing from the table gets no MFU rather than another GPU's."""
    from dsv3.train.metrics import peak_flops
    assert peak_flops(torch.device("cpu")) is None
    for name, tflops in [("NVIDIA H100 80GB HBM3", 1979 / 2), ("NVIDIA H100 PCIe", 1513 / 2),
                         ("NVIDIA H100 NVL", 1671 / 2), ("NVIDIA H200", 1979 / 2), ("NVIDIA A100-SXM4-80GB", 312),
                         ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak = peak_flops(torch.device("cuda"))
        assert peak == (pytest.approx(tflops * 1e12, rel=2e-3) if tflops else None), name

