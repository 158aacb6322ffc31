"""Load and save DeepSeek checkpoints in the Hugging Face layout (docs/architecture.md#checkpoint-layout; FP8
weights: docs/fp8.md#checkpoint-format).

The name table (ours -> checkpoint) is three rules:
  - main model tensors gain the `model.` prefix (`layers.3.mlp.gate.weight` -> `model.layers.3.mlp.gate.weight`),
    `lm_head.weight` stays;
  - MTP module k (`mtp.k.*`) lives at `model.layers.{num_hidden_layers + k}.*`; the checkpoint also stores copies
    of the embedding and head there (`embed_tokens`, `shared_head.head`), which we write and never read;
  - stacked experts `mlp.experts.gate_up_proj` (E, 2F, D) / `down_proj` (E, D, F) are per-expert tensors
    `mlp.experts.{e}.{gate,up,down}_proj.weight` on disk.
Loading builds the model on the meta device, allocates it once in the target dtype and streams tensors shard by
shard into it (FP8 weights are dequantized per 128×128 block on the way). Safetensors only: nothing unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv3 import fp8
from dsv3.config import ModelConfig
from dsv3.fp8.format import BLOCK, FP8, dequantize, quantize
from dsv3.fp8.quantize import quantize_blocks
from dsv3.model import Transformer

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"(.*mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
# Decoder-layer linear weights that DeepSeek stores in FP8 (router, norms, eh_proj, embed, head stay bf16).
_FP8_NAME = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                       r"o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight")
DEFAULT_SHARD_BYTES = 4 << 30


# ---- the name table ----------------------------------------------------------------------------------------
def hf_name(key: str, cfg: ModelConfig) -> str:
    if key.startswith("mtp."):
        k, rest = key[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    return key if key == "lm_head.weight" else f"model.{key}"


def our_name(name: str, cfg: ModelConfig) -> tuple[str, tuple | None] | None:
    """Checkpoint name -> (our key, where inside it) for a stacked expert slice; None for ignored copies."""
    m = _LAYER.fullmatch(name)
    if m:
        n, rest = int(m.group(1)), m.group(2)
        if n >= cfg.num_hidden_layers:
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                return None  # MTP's copies of the shared embedding / head
            prefix = f"mtp.{n - cfg.num_hidden_layers}."
        else:
            prefix = f"layers.{n}."
        e = _EXPERT.fullmatch(rest)
        if e:
            stem, idx, which = e.group(1), int(e.group(2)), e.group(3)
            F_ = cfg.moe_intermediate_size
            if which == "down":
                return f"{prefix}{stem}.down_proj", (idx,)
            rows = slice(0, F_) if which == "gate" else slice(F_, 2 * F_)
            return f"{prefix}{stem}.gate_up_proj", (idx, rows)
        return prefix + rest, None
    if name.startswith("model."):
        return name[len("model."):], None
    return name, None


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict as checkpoint (name, tensor) pairs, experts split, MTP copies of embed/head added."""
    cfg = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    for key, t in sd.items():
        name = hf_name(key, cfg)
        if key.endswith("mlp.experts.gate_up_proj"):
            F_ = cfg.moe_intermediate_size
            stem = name[: -len(".gate_up_proj")]
            for e in range(t.shape[0]):
                yield f"{stem}.{e}.gate_proj.weight", t[e, :F_]
                yield f"{stem}.{e}.up_proj.weight", t[e, F_:]
        elif key.endswith("mlp.experts.down_proj"):
            stem = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{stem}.{e}.down_proj.weight", t[e]
        else:
            yield name, t
    for k in range(cfg.num_nextn_predict_layers):
        n = cfg.num_hidden_layers + k
        # Copies (safetensors refuses two names on one storage); the official checkpoint stores them too.
        yield f"model.layers.{n}.embed_tokens.weight", model.embed_tokens.weight.detach().clone()
        yield f"model.layers.{n}.shared_head.head.weight", model.lm_head.weight.detach().clone()


# ---- loading -----------------------------------------------------------------------------------------------
def weight_map(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        for f in sorted(set(wm.values())):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f}: checkpoint shard listed in {index.name} is missing")
        return {name: path / f for name, f in wm.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (only safetensors checkpoints are loaded)")
    wm = {}
    for f in files:
        with _open(f) as sf:
            wm.update({name: f for name in sf.keys()})
    return wm


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None


def _read(handles: dict, f: Path, name: str) -> torch.Tensor:
    if f not in handles:
        handles[f] = _open(f).__enter__()
    try:
        return handles[f].get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: tensor {name} could not be read ({e})") from None


def read_tensor(handles: dict, wm: dict[str, Path], name: str) -> torch.Tensor:
    """One checkpoint tensor; FP8 weights come back dequantized to fp32 with their `_scale_inv` blocks."""
    t = _read(handles, wm[name], name)
    if t.dtype == FP8:
        t = dequantize(t, _scale_inv(handles, wm, name), torch.float32, name)
    return t


def _scale_inv(handles: dict, wm: dict[str, Path], name: str) -> torch.Tensor:
    """The 128×128 block scales stored beside FP8 weight `name`."""
    if name + "_scale_inv" not in wm:
        raise ValueError(f"{wm[name]}: FP8 tensor {name} has no {name}_scale_inv")
    return _read(handles, wm[name + "_scale_inv"], name + "_scale_inv")


def _load_fp8(handles: dict, wm: dict[str, Path], name: str, params: dict, key: str, where, filled: dict,
              mis_shaped: list) -> None:
    """Checkpoint weight `name` into an FP8 module's e4m3 buffer `key` and its block scales (`key` + _scale_inv):
    as the file stores them when it is FP8, quantized here when not. `where`: an expert's slice (its index, and for
    gate / up their rows, which start on a 128-row block)."""
    skey = key + "_scale_inv"
    q_dst, s_dst = params[key].data, params[skey].data
    t = _read(handles, wm[name], name)
    if t.dtype == FP8:
        s = _scale_inv(handles, wm, name)
    else:  # as fp8_weights() quantizes a loaded model
        t, s = quantize_blocks(t.to(q_dst.device))
    if where is not None:
        q_dst, s_dst = q_dst[where[0]], s_dst[where[0]]
        if len(where) > 1:
            rows = where[1]
            q_dst, s_dst = q_dst[rows], s_dst[rows.start // BLOCK: -(-rows.stop // BLOCK)]
    if tuple(t.shape) != tuple(q_dst.shape) or tuple(s.shape) != tuple(s_dst.shape):
        mis_shaped.append(f"{name}: checkpoint {tuple(t.shape)} with scales {tuple(s.shape)}, model "
                          f"{tuple(q_dst.shape)} with scales {tuple(s_dst.shape)}")
        filled[key], filled[skey] = params[key].numel(), params[skey].numel()
        return
    q_dst.copy_(t)
    s_dst.copy_(s)
    filled[key] = filled.get(key, 0) + t.numel()
    filled[skey] = filled.get(skey, 0) + s.numel()


def close(handles: dict) -> None:
    for h in handles.values():
        h.__exit__(None, None, None)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               config: ModelConfig | None = None, fp8_weights: bool = False) -> Transformer:
    """A directory of config.json + (sharded) safetensors in the Hugging Face layout -> Transformer in eval mode.

    `fp8_weights`: the decoder's linears and routed experts held in FP8 for inference (dsv3/fp8/inference.py),
    an FP8 checkpoint's e4m3 values and scales taken as they are (a bf16 one's quantized as they load), so the
    model never exists in bf16. (Routed experts whose width is not a multiple of 128 cannot stack their gate and
    up blocks: such a model loads in `dtype` and is converted after.)"""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    cfg = config or ModelConfig.from_json(path)
    wm = weight_map(path)
    mtp_names = [n for n in wm if (m := _LAYER.fullmatch(n)) and int(m.group(1)) >= cfg.num_hidden_layers]
    if cfg.num_nextn_predict_layers and not any(not n.endswith(("embed_tokens.weight", "head.weight"))
                                                  for n in mtp_names):
        warnings.warn(f"{path}: config asks for {cfg.num_nextn_predict_layers} MTP module(s) but the checkpoint "
                      "has no MTP weights; MTP is off", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = build_model(cfg, "meta", dtype)
    if fp8_weights:
        if cfg.moe_intermediate_size % BLOCK:
            model = load_model(path, device, dtype, cfg)
            fp8.fp8_weights(model)
            return model
        fp8.fp8_weights(model)  # on the meta device: FP8 modules whose buffers the loop below fills
    model = _materialize(model, device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: dict[str, int] = {}  # our key -> elements written (stacked experts are filled in slices)
    unexpected, mis_shaped, handles = [], [], {}
    try:
        for name in wm:
            if name.endswith("_scale_inv"):
                continue  # consumed with its weight
            target = our_name(name, cfg)
            if target is None:
                continue
            key, where = target
            if key in params and params[key].dtype == FP8:
                _load_fp8(handles, wm, name, params, key, where, filled, mis_shaped)
                continue
            t = read_tensor(handles, wm, name)
            if key not in params:
                # transformers writes zero-size shared experts when n_shared_experts is 0: ignore only those.
                if not ("shared_experts" in name and t.numel() == 0 and not cfg.n_shared_experts):
                    unexpected.append(name)
                continue
            dst = params[key].data if where is None else params[key].data[where]
            if tuple(t.shape) != tuple(dst.shape):
                mis_shaped.append(f"{name}: checkpoint {tuple(t.shape)}, model {tuple(dst.shape)}")
                filled[key] = params[key].numel()  # reported as mis-shaped, not also as missing
                continue
            dst.copy_(t)
            filled[key] = filled.get(key, 0) + t.numel()
    finally:
        close(handles)
    missing = [k for k, p in params.items() if k in _persistent(model) and filled.get(k, 0) != p.numel()]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(hf_name(k, cfg) for k in missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {'; '.join(mis_shaped)}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json — " + " | ".join(problems))
    return model.eval()


def _persistent(model: Transformer) -> set[str]:
    keys = set(model.state_dict().keys())
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def build_model(cfg: ModelConfig, device="meta", dtype: torch.dtype = torch.float32) -> Transformer:
    """Construct with parameters created directly in `dtype` (the routing bias stays fp32)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(cfg)
    finally:
        torch.set_default_dtype(prev)


def _materialize(model: Transformer, device) -> Transformer:
    """Allocate a meta model once on `device` (values are filled by the loader)."""
    model = model.to_empty(device=device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers()
    return model


# ---- saving ------------------------------------------------------------------------------------------------
def fp8_quantization_config(ue8m0: bool = False) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            **({"scale_fmt": "ue8m0"} if ue8m0 else {})}


def export_tensors(named, dtype: torch.dtype, fp8_blocks: bool, ue8m0: bool):
    """Checkpoint tensors as DeepSeek stores them: balance biases fp32; decoder-layer linear weights as e4m3 +
    `weight_scale_inv` when `fp8_blocks`; everything else in `dtype`."""
    for name, t in named:
        t = t.detach()
        if name.endswith("e_score_correction_bias"):
            yield name, t.float()
        elif fp8_blocks and _FP8_NAME.fullmatch(name):
            q, s = quantize(t, ue8m0)
            yield name, q
            yield name + "_scale_inv", s
        else:
            yield name, t.to(dtype)


def save_model(model: Transformer, path: str | Path, dtype: torch.dtype | None = None, fp8_blocks: bool = False,
               ue8m0: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write config.json + sharded safetensors + index, atomically (temp dir, then rename)."""
    if any(b.dtype == FP8 for b in model.buffers()):
        raise ValueError("save_model: this model holds FP8 inference weights (fp8_weights); save the model it was "
                         "made from (fp8_blocks=True writes DeepSeek's FP8 format), or convert with `dsv3 convert`")
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    if fp8_blocks:
        cfg = cfg.replace(quantization_config=fp8_quantization_config(ue8m0))
    return write_checkpoint(path, cfg, export_tensors(hf_tensors(model), dtype, fp8_blocks, ue8m0),
                            str(dtype).removeprefix("torch."), max_shard_bytes)


def write_checkpoint(path: str | Path, cfg: ModelConfig, tensors, dtype_name: str,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: dict[str, Path] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards, cur, cur_bytes = [], {}, 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if cur and cur_bytes + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = {}, 0
            cur[name] = t.contiguous().cpu()
            cur_bytes += nbytes
        shards.append(cur)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg.save_json(tmp / "config.json", dtype_name)
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(tmp: Path, path: Path) -> None:
    """Swap a finished temp dir into place; an old checkpoint is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
