"""ModelConfig: the architecture, with field names equal to the Hugging Face `config.json` keys.

Reads `model_type` deepseek_v3 and deepseek_v2 configs (legacy `rope_scaling` + `rope_theta`, or the newer
`rope_parameters`), validates them with errors that name the field and the value, and writes the official
DeepSeek key set back (transformers 5 omits `topk_method` / `scoring_func`; vLLM needs them). Presets are
plain functions of nothing, listed in PRESETS.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("sigmoid", "softmax")
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None => plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1  # D, the MTP depth
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    # Legacy HF form: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    # "mscale", "mscale_all_dim"} or None. A frozen dataclass cannot hash a dict, so it is excluded from hashing.
    rope_scaling: dict | None = field(default=None, hash=False)
    rope_interleave: bool = True  # DeepSeek weights store rope rows as interleaved pairs (docs/architecture.md#rope-layout)
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.006  # V3 paper init std (HF default would be 0.02)
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight α (docs/architecture.md#sequence-wise-balance-loss)
    quantization_config: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    def is_moe_layer(self, layer: int) -> bool:
        # MTP blocks are always MoE (HF builds them with first_k_dense_replace forced to 0).
        if layer >= self.num_hidden_layers:
            return self.n_routed_experts > 0
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"is not supported (expected one of {MODEL_TYPES})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "moe_layer_freq"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be a positive even integer (RoPE rotates pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be null (plain q_proj) or a positive integer")
        if self.hidden_act != "silu":
            bad("hidden_act", "is not supported (DeepSeek uses silu)")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"is unknown (expected one of {TOPK_METHODS})")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"is unknown (expected one of {SCORING_FUNCS})")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            bad("n_routed_experts" if self.n_routed_experts < 0 else "n_shared_experts", "must be >= 0")
        if self.n_routed_experts:
            self._validate_routing(bad)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.type={self.rope_type!r} is an unknown rope type "
                             f"(expected one of {ROPE_TYPES})")
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling.{key} is missing for YaRN")
        if self.quantization_config:
            block = self.quantization_config.get("weight_block_size", [128, 128])
            if self.quantization_config.get("quant_method") != "fp8" or list(block) != [128, 128]:
                raise ValueError(f"quantization_config={self.quantization_config!r} is not supported "
                                 "(expected quant_method fp8 with weight_block_size [128, 128])")

    def _validate_routing(self, bad) -> None:
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if not 0 < K <= E:
            bad("num_experts_per_tok", f"must be in 1..n_routed_experts={E}")
        if self.n_group <= 0 or E % self.n_group:
            bad("n_group", f"must divide n_routed_experts={E}")
        if not 0 < self.topk_group <= self.n_group:
            bad("topk_group", f"must be in 1..n_group={self.n_group}")
        per_group = E // self.n_group
        if self.topk_method != "greedy" and K > self.topk_group * per_group:
            bad("num_experts_per_tok", f"is larger than the {self.topk_group * per_group} experts in "
                                       f"topk_group={self.topk_group} groups of {per_group}")
        if self.topk_method == "noaux_tc" and per_group < 2 and self.n_group > 1:
            bad("n_group", f"leaves {per_group} expert per group; noaux_tc scores a group by its top-2 sum")

    # ---- Hugging Face config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported (expected one of {MODEL_TYPES})")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:  # transformers 5 alias
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        # The newer `rope_parameters` carries rope_theta inside; fold it into the legacy pair we store.
        params = d.get("rope_parameters")
        if params:
            params = dict(params)
            kw["rope_theta"] = params.pop("rope_theta", kw.get("rope_theta", 10000.0))
            rtype = params.pop("rope_type", params.pop("type", "default"))
            kw["rope_scaling"] = None if rtype == "default" else {"type": rtype, **params}
        elif kw.get("rope_scaling"):
            rs = dict(kw["rope_scaling"])
            rs["type"] = rs.pop("rope_type", None) or rs.get("type", "default")
            kw["rope_scaling"] = None if rs["type"] == "default" else rs
        if model_type == "deepseek_v2":
            # V2 defaults differ from V3 (docs/architecture.md#config-fields); V2 always stores interleaved rope rows.
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw.setdefault("first_k_dense_replace", 0)
            kw.setdefault("num_nextn_predict_layers", 0)
            kw["rope_interleave"] = True
        for key in ("n_group", "topk_group"):
            if kw.get(key) is None:
                kw[key] = 1
        if kw.get("q_lora_rank") == 0:  # official configs use 0 for "no q compression"
            kw["q_lora_rank"] = None
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0]
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The official DeepSeek key set, readable by transformers, vLLM and SGLang."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                              else "DeepseekV2ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads  # MLA has no GQA; transformers reads this key
        d["attention_dropout"] = 0.0
        d["ep_size"] = 1
        d["seq_aux"] = True
        d["use_cache"] = True
        if self.model_type == "deepseek_v2":
            d.pop("rope_interleave")
            d.pop("num_nextn_predict_layers")
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return d

    def save_json(self, path: str | Path, dtype: str = "bfloat16") -> None:
        d = self.to_hf_dict()
        d["torch_dtype"] = dtype
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    # ---- construction helpers ------------------------------------------------------------------------------
    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_vocab(self, n_tokens: int) -> "ModelConfig":
        """Size the embedding for a tokenizer: padded to a multiple of 64 (GEMM-friendly)."""
        return self.replace(vocab_size=int(math.ceil(n_tokens / 64) * 64))


# ---- presets ----------------------------------------------------------------------------------------------
def _tiny() -> ModelConfig:
    # ~10M parameters: trains on 2 CPU cores in minutes; 4 layers so DualPipeV at PP=2 can split it.
    return ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
                       qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                       first_k_dense_replace=1, max_position_embeddings=2048)


def _tiny_576() -> ModelConfig:
    # vLLM's CPU MLA kernel only takes a 576-wide latent (kv_lora_rank 512 + rope 64).
    return _tiny().replace(kv_lora_rank=512, qk_rope_head_dim=64)


def _bench_684m() -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
                       num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=512,
                       kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
                       routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=16384)


def _yarn(factor: float, mscale: float) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(rope_scaling=_yarn(40, 1.0))  # the dataclass defaults are V3-671B


def _deepseek_v2_lite() -> ModelConfig:
    return ModelConfig(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                       moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
                       n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                       topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                       routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=0,
                       rope_scaling=_yarn(40, 0.707), bos_token_id=100000, eos_token_id=100001,
                       aux_loss_alpha=0.001)


def _16b_slice() -> ModelConfig:
    return _deepseek_v2_lite().replace(num_hidden_layers=4)


def _v3_slice() -> ModelConfig:
    # DeepSeek-V3 layer shapes, 16 experts, 1 dense + 2 MoE layers: 2.91B parameters, where FP8 can pay.
    return ModelConfig(vocab_size=32000, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16,
                       num_nextn_predict_layers=0, max_position_embeddings=16384)


PRESETS = {"tiny": _tiny, "tiny-576": _tiny_576, "bench-684m": _bench_684m, "deepseek-v3": _deepseek_v3,
           "deepseek-v2-lite": _deepseek_v2_lite, "16b-slice": _16b_slice, "v3-slice": _v3_slice}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown (expected one of {sorted(PRESETS)})")
    return PRESETS[name]()
