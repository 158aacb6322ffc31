"""Data-parallel training (FSDP2, gloo on the CPU) against one process on the same global batch: `torchrun
--nproc-per-node 2 -m dsv3 train` must give the same losses, gradient norms, balance biases and weights, and its
sharded checkpoint must resume in one process.

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

    def train(out, nproc, *extra):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-port", str(_free_port()), "-m", "dsv3"] if nproc > 1 else [sys.executable, "-m", "dsv3"])
        r = subprocess.run([*launcher, *common, "--out", str(root / out), *extra], capture_output=True, text=True,
                           timeout=600)
        return r

    one = train("one", 1, "--steps", "6")
    assert one.returncode == 0, one.stderr[-3000:]
    tok = ["--tokenizer", str(root / "one" / "tokenizer")]
    two = train("two", 2, "--steps", "6", *tok)
    assert two.returncode == 0, two.stderr[-3000:]
    # The sharded step-4 checkpoint of the 2-rank run, continued by 1 process.
    shutil.copytree(root / "two", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "step_0000006")
    resumed = train("resumed", 1, "--steps", "6", "--resume", *tok)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    bad = train("bad", 2, "--steps", "1", "--dp-shard", "3", *tok)
    return root, bad


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def _same_run(run, ref, rel):
    (train1, val1), (train2, val2) = _metrics(ref), _metrics(run)
    assert [r["step"] for r in train2] == list(range(1, 7))
    for a, b in zip(train1, train2):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (a["step"], key)
        assert b["maxvio"] == pytest.approx(a["maxvio"], abs=1e-3)  # the loads of the global batch
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


def test_sharded_checkpoint_resumes_in_one_process(runs):
    root, _ = runs
    assert sorted(p.name for p in (root / "two" / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000006"]
    _same_run(root / "resumed", root / "one", rel=1e-5)


def test_bad_layout_is_one_clear_error(runs):
    _, bad = runs
    assert bad.returncode != 0
    assert "--dp-shard 3 does not fit the world size 2" in bad.stderr
    assert bad.stderr.count("does not fit") == 1  # rank 0 says it; the other exits quietly
