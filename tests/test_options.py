"""Command configs (dsv3/options.py): every field is a flag whose help shows the field's own default, flags parse
into the composed pieces, a run.json round-trips, and a run.json written before the pieces existed (every key
flat) still loads and resumes."""
import dataclasses
import json
import re

import pytest

from dsv3.cli import build_parser, main
from dsv3.infer.llm import LoadConfig
from dsv3.options import from_args, read_config, to_json
from dsv3.quickstart import QuickstartConfig
from dsv3.rl.evaluate import EvalConfig
from dsv3.rl.grpo import GRPOConfig
from dsv3.rl.rft import RFTConfig
from dsv3.rl.sft import SFTConfig
from dsv3.rl.tasks import get_task
from dsv3.train.config import OptimConfig, RuntimeConfig, TrainConfig

VERBS = {"train": TrainConfig, "sft": SFTConfig, "grpo": GRPOConfig, "rft": RFTConfig, "eval": EvalConfig,
         "quickstart": QuickstartConfig, "generate": LoadConfig, "chat": LoadConfig, "serve": LoadConfig}


def _subparser(verb):
    return build_parser()._subparsers._group_actions[0].choices[verb]


def _defaults(cfg) -> dict:
    """Flat name -> default value of a config instance, pieces spread out (as the command line sees them)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(_defaults(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_field_is_a_flag_whose_help_shows_the_fields_default(verb):
    actions = {a.dest: a for a in _subparser(verb)._actions}
    for name, value in _defaults(VERBS[verb]()).items():
        action = actions[name]
        assert action.help and len(action.help) > 10, name
        if not action.option_strings or action.required:  # positional or required: nothing to default to
            continue
        shown = re.search(r"\(default:? ([^):]*)", action.help)
        assert shown, (name, action.help)
        if value is None or value in ([], ""):
            assert "(default: " in action.help, (name, action.help)
        elif isinstance(value, bool):
            assert shown[1] == ("on" if value else "off"), (name, action.help)
        else:
            assert type(value)(shown[1]) == value, (name, action.help)


def test_a_commands_own_defaults_and_flat_keywords_reach_its_pieces():
    sft = SFTConfig()
    assert (sft.optim.lr, sft.optim.warmup, sft.runtime.out, sft.runtime.keep) == (5e-5, 10, "runs/sft", 1)
    tuned = SFTConfig(lr=1e-4, threads=3)  # the other optim fields keep SFT's defaults, not the piece's
    assert tuned.optim == dataclasses.replace(sft.optim, lr=1e-4) and tuned.runtime.threads == 3
    assert GRPOConfig().optim == OptimConfig(lr=1e-6, warmup=0, schedule="wsd", decay_fraction=0.0,
                                             weight_decay=0.0, beta2=0.99)
    assert TrainConfig().optim == OptimConfig() and TrainConfig().runtime == RuntimeConfig()
    with pytest.raises(TypeError, match="'bogus'"):
        TrainConfig(bogus=1)
    with pytest.raises(ValueError, match="schedule='linear' must be one of"):
        SFTConfig(schedule="linear")


def test_flags_parse_into_the_pieces():
    args = build_parser().parse_args(["train", "--lr", "0.5", "--device", "cpu", "--pp", "2", "--no-mtp",
                                      "--data", "a.txt", "b.txt", "--micro-batch-size", "4"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.optim.lr, cfg.runtime.device, cfg.parallel.pp, cfg.mtp, cfg.data, cfg.micro_batch_size) == \
        (0.5, "cpu", 2, False, ["a.txt", "b.txt"], 4)
    assert cfg == TrainConfig(lr=0.5, device="cpu", pp=2, mtp=False, data=["a.txt", "b.txt"], micro_batch_size=4)
    grpo = from_args(GRPOConfig, build_parser().parse_args(["grpo", "-G", "4", "--task", "chain:2-4"]))
    assert grpo.group_size == 4 and grpo.task == "chain:2-4" and grpo.optim.lr == 1e-6
    qs = from_args(QuickstartConfig, build_parser().parse_args(["quickstart", "--threads", "2", "--out", "q"]))
    assert (qs.steps, qs.runtime.threads, qs.runtime.out) == (960, 2, "q")
    rft = from_args(RFTConfig, build_parser().parse_args(["rft", "ckpt", "--lr", "1e-4", "--k", "4"]))
    assert (rft.checkpoint, rft.k, rft.optim.lr, rft.optim.warmup, rft.runtime.out) == ("ckpt", 4, 1e-4, 10, "runs/rft")
    ev = from_args(EvalConfig, build_parser().parse_args(["eval", "ckpt", "--fp8-weights", "--dtype", "float32"]))
    assert (ev.checkpoint, ev.task, ev.load) == ("ckpt", None, LoadConfig(fp8_weights=True, dtype="float32"))


def test_device_is_one_flag_with_one_help_and_default():
    helps = {verb: next(a.help for a in _subparser(verb)._actions if a.dest == "device") for verb in VERBS}
    assert len(set(helps.values())) == 1 and "(default auto)" in helps["serve"]


def test_task_help_names_every_task_generator():
    for verb in ("grpo", "rft", "eval"):
        text = next(a.help for a in _subparser(verb)._actions if a.dest == "task")
        for kind in ("arithmetic", "chain", "countdown"):
            get_task(kind)  # a task generator get_task knows
            assert kind in text, (verb, kind)
        assert "rg:" in text


def test_fp8_experts_help_points_to_the_docs_instead_of_quoting_numbers():
    text = next(a.help for a in _subparser("train")._actions if a.dest == "fp8_experts")
    assert "docs/fp8.md" in text and not re.search(r"\d\.\d", text)


def test_run_json_round_trips(tmp_path):
    cfg = TrainConfig(lr=0.01, device="cpu", ep=2, data=["x"], steps=7, precision="fp8")
    path = tmp_path / "run.json"
    path.write_text(to_json(cfg))
    assert json.loads(path.read_text())["optim"]["lr"] == 0.01  # written by piece
    assert TrainConfig(**read_config(TrainConfig, path)) == cfg


# A run.json as `dsv3 train` wrote it before the pieces (TrainConfig.to_json of commit 8e5db1a): every key flat.
LEGACY_RUN_JSON = {
    "preset": "tiny", "init_from": None, "data": [], "tokenizer": None, "vocab_size": 4096, "model_vocab_size": 0,
    "num_layers": 0, "seq_len": 256, "fim_rate": 0.1, "val_fraction": 0.02, "doc_mask": False, "steps": 1000,
    "batch_size": 16, "micro_batch_size": None, "lr": 0.003, "min_lr_ratio": 0.1, "warmup": 100,
    "schedule": "cosine", "decay_fraction": 0.2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
    "grad_clip": 1.0, "init_std": 0.006, "balance": "auto", "bias_update_rate": 0.001, "seq_aux_alpha": 0.0001,
    "aux_alpha": 0.01, "mtp": True, "mtp_lambda": 0.3, "mtp_lambda_final": 0.1, "mtp_lambda_switch": 0.7,
    "out": "runs/train", "resume": False, "eval_every": 100, "eval_batches": 20, "save_every": 500, "keep": 2,
    "seed": 0, "device": "auto", "param_dtype": "fp32", "autocast": None, "precision": "bf16",
    "fp8_experts": False, "fp8_min_dim": 1024, "fp8_ue8m0": False, "moments_dtype": "fp32", "compile": False,
    "activation_checkpointing": False, "threads": None, "profile_steps": 0, "dp_shard": -1, "ep": 1, "pp": 1,
    "pp_schedule": "1f1b", "pp_microbatches": 0,
}
ADDED_SINCE = {"text_column": "text"}  # TrainConfig fields added after that format, with their defaults


def test_a_legacy_flat_run_json_loads_into_the_pieces(tmp_path):
    legacy = {**LEGACY_RUN_JSON, "lr": 0.02, "beta2": 0.9, "seed": 5, "keep": 3, "pp": 2, "moments_dtype": "bf16"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(legacy))
    cfg = TrainConfig(**read_config(TrainConfig, path))
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.moments_dtype) == (0.02, 0.9, "bf16")
    assert (cfg.runtime.seed, cfg.runtime.keep, cfg.parallel.pp) == (5, 3, 2)
    assert _defaults(cfg) == legacy | ADDED_SINCE  # nothing lost or renamed; new fields take their defaults
    path.write_text(json.dumps({**legacy, "speling": 1}))
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['speling'\]"):
        read_config(TrainConfig, path)


def test_resume_of_a_run_whose_run_json_is_flat(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"the king speaks to the queen {i} .\nthe ghost walks upon the wall .\n" * 30)
    run = tmp_path / "run"
    main(["train", "--data", str(corpus), "--out", str(run), "--vocab-size", "512", "--seq-len", "32",
          "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--warmup", "1",
          "--num-layers", "1", "--val-fraction", "0.1", "--threads", "2", "--device", "cpu"])
    written = json.loads((run / "run.json").read_text())
    flat = {k: v for key, value in written.items() for k, v in (value.items() if isinstance(value, dict)
                                                                 else [(key, value)])}
    assert set(flat) == set(LEGACY_RUN_JSON) | set(ADDED_SINCE)  # the flat key set of the old format, and new ones
    (run / "run.json").write_text(json.dumps({**flat, "steps": 4}))  # as an older dsv3 wrote it
    main(["train", "--resume", "--out", str(run)])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_0000004"
