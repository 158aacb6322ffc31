"""Training checkpoints: a resumable state and a Hugging Face export, written atomically, the last k kept.

RUN_DIR/checkpoints/step_0000500/
  state/         model + optimizer + RNG in torch.distributed.checkpoint format (works in one process, and
                 sharded under FSDP later). DCP pickles its metadata, so we only ever load our own folders, and
                 check the JSON manifest below before touching it.
  trainer.json   manifest: format, step, model config (+ hash), train config, data-loader position, metrics.
  model/         config.json + safetensors + tokenizer: what others load (dsv3.load_model, transformers).
A step folder is complete or absent: it is written under a temporary name and renamed last.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from dsv3.io import save_model
from dsv3.io.hf import build_model
from dsv3.model import Transformer
from dsv3.train.parallel import Layout, barrier

FORMAT = "dsv3-train-state/1"


def config_hash(model_config: dict) -> str:
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "trainer.json").is_file()) if root.is_dir() else []


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run_dir: Path, step: int, model: Transformer, opt, manifest: dict, keep: int,
                    tokenizer_dir: Path | None, layout: Layout = Layout()) -> Path:
    """Every rank calls it under torchrun (the state is saved sharded); rank 0 writes the rest and renames."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{'dist' if layout.distributed else os.getpid()}"
    if layout.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(layout)
    try:
        model_sd, optim_sd = get_state_dict(model, opt)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=str(tmp / "state"))
        if layout.distributed:  # the export needs whole tensors: gather them to rank 0 (on the CPU)
            if layout.pp > 1:  # disjoint stages, each (sharded or not) over its data-parallel ranks
                own = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
                       for k, v in model.state_dict().items()}
                parts = [None] * layout.world
                torch.distributed.gather_object(own if layout.dp_rank == 0 else {}, parts if layout.main else None,
                                                dst=0)
                full = {k: v for part in parts for k, v in part.items()} if layout.main else {}
            else:
                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if layout.main:
                plain = build_model(model.config, device="cpu", dtype=next(iter(full.values())).dtype)
                plain.load_state_dict(full)
                model = plain
        if layout.main:
            cfg = model.config.to_hf_dict()
            manifest = {"format": FORMAT, "step": step, "model_config": cfg, "config_hash": config_hash(cfg),
                        **manifest}
            (tmp / "trainer.json").write_text(json.dumps(manifest, indent=2) + "\n")
            save_model(model, tmp / "model")
            for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir else ():
                shutil.copyfile(tokenizer_dir / name, tmp / "model" / name)
            if final.exists():  # re-saving a step (e.g. Ctrl-C right after a scheduled save)
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if layout.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if layout.main:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(layout)
    return final


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / "trainer.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable dsv3 training manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format={manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_checkpoint(ckpt: Path, model: Transformer, opt) -> dict:
    """Restore model, optimizer and RNG in place after checking the manifest matches this model."""
    manifest = read_manifest(ckpt)
    cfg = model.config.to_hf_dict()
    if manifest["config_hash"] != config_hash(cfg):
        diff = sorted(k for k in set(cfg) | set(manifest["model_config"])
                      if cfg.get(k) != manifest["model_config"].get(k))
        raise ValueError(f"{ckpt}: written for another architecture; differing fields: "
                         + ", ".join(f"{k}={manifest['model_config'].get(k)!r} (checkpoint) vs {cfg.get(k)!r}"
                                     for k in diff))
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, checkpoint_id=str(Path(ckpt) / "state"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return manifest
