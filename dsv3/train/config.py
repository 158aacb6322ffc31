"""The `dsv3 train` config, and the pieces that training, SFT, GRPO and RFT share: OptimConfig (AdamW and the
learning-rate schedule), RuntimeConfig (device, precision of the weights, threads, seed, run directory) and
ParallelConfig (torchrun layouts). Each field is a flag (dsv3/options.py); `--config run.json` repeats a run
(every run writes one; a run.json from before the pieces, with every key flat, loads too)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dsv3 import options
from dsv3.options import add_flags, check, flat_init, option, piece, positive, read_config
from dsv3.runtime import device_option


@dataclass(slots=True)
class OptimConfig:
    """AdamW with weight decay on matrices only (dsv3/train/optim.py), and its learning-rate schedule."""
    lr: float = option(3e-3, help="peak learning rate")
    schedule: str = option("cosine", choices=("cosine", "wsd"),
                           help="after warmup: cosine decay to min-lr-ratio, or warmup-stable-decay (linear decay "
                                "over the last decay-fraction of the steps)")
    warmup: int = option(100, help="linear warmup (steps)")
    min_lr_ratio: float = option(0.1, help="final learning rate as a fraction of the peak")
    decay_fraction: float = option(0.2, help="wsd: fraction of steps spent decaying at the end")
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices")
    beta1: float = option(0.9, help="AdamW β1 (first-moment decay)")
    beta2: float = option(0.95, help="AdamW β2 (second-moment decay)")
    grad_clip: float = option(1.0, help="global gradient-norm clip")
    moments_dtype: str = option("fp32", choices=("fp32", "bf16"),
                                help="AdamW moment storage: bf16 halves the optimizer state (DeepSeek-V3's setting)")

    def __post_init__(self):
        check(self)


@dataclass(slots=True)
class RuntimeConfig:
    """Where and how a training run executes, and where it writes."""
    device: str = device_option()
    param_dtype: str = option("fp32", choices=("fp32", "bf16"),
                              help="parameter dtype on a GPU: fp32 master weights, or bf16 (a CPU trains in fp32)")
    autocast: bool | None = option(None, unset="on for GPU, off on CPU",
                                   help="bf16 autocast over the parameters (on a CPU with native bf16 matmuls, such "
                                        "as AVX512-BF16 or AMX, it trains faster)")
    threads: int | None = option(None, unset="torch's choice", help="CPU threads for torch")
    seed: int = option(0, help="seed of everything random in the run: initialisation, data order, FIM, sampling")
    out: str = option("runs/train", help="run directory: checkpoints, metrics.jsonl, plots")
    keep: int = option(2, help="checkpoints to keep")

    def __post_init__(self):
        check(self)
        positive(self, "keep")

    def dtype(self, device: torch.device) -> torch.dtype:
        """The parameters' dtype on `device`: bf16 only where asked for and on a GPU."""
        return torch.bfloat16 if self.param_dtype == "bf16" and device.type == "cuda" else torch.float32

    def use_autocast(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.autocast is None else self.autocast


@dataclass(slots=True)
class ParallelConfig:
    """Layouts under torchrun (dsv3/train/parallel.py, dsv3/train/pipeline.py)."""
    dp_shard: int = option(-1, help="under torchrun: data-parallel (FSDP2) ranks per pipeline stage; -1: all of "
                                    "them")
    ep: int = option(1, help="under torchrun: expert parallelism, routed experts split over groups of this many "
                             "ranks with all-to-all dispatch")
    pp: int = option(1, help="under torchrun: pipeline stages' ranks (layer ranges as stages); the world size over "
                             "pp is the data-parallel size of each stage")
    pp_schedule: str = option("1f1b", choices=("1f1b", "dualpipev"),
                              help="pipeline schedule (dualpipev: DeepSeek-V3's bidirectional schedule, two stages "
                                   "per rank)")
    pp_microbatches: int = option(0, unset="the number of stages", help="pipeline micro-batches per micro-batch")

    def __post_init__(self):
        check(self)


@flat_init
@dataclass(slots=True)
class TrainConfig:
    # model and data
    preset: str = option("tiny", help="model preset for a new model")
    init_from: str | None = option(None, unset="a new model", help="start from the weights of this checkpoint "
                                                                  "directory (Hugging Face layout)")
    data: list[str] = option(default_factory=list, nargs="+", unset="the shipped corpus",
                             help=".txt / .jsonl (optionally .xz/.gz) / .parquet files, directories of them, or "
                                  "Hugging Face datasets folders (save_to_disk); or one run's data/ directory of "
                                  "token files, with that run's --tokenizer")
    text_column: str = option("text", help="the field of .jsonl records and the column of Parquet / datasets files "
                                           "that holds each document's text")
    tokenizer: str | None = option(None, unset="a byte-level BPE trained on the data",
                                   help="directory with tokenizer.json to use instead of training a BPE")
    vocab_size: int = option(4096, help="BPE vocabulary size when training a tokenizer (tokens)")
    model_vocab_size: int = option(0, unset="the tokenizer's size, padded to a multiple of 64",
                                   help="embedding rows when larger than the tokenizer's (room for added tokens, or "
                                        "a peer's config)")
    num_layers: int = option(0, unset="the preset's", help="decoder layers of a new model")
    seq_len: int = option(256, help="training sequence length (tokens)")
    fim_rate: float = option(0.1, help="fraction of documents rewritten fill-in-the-middle")
    val_fraction: float = option(0.02, help="fraction of documents held out for validation")
    doc_mask: bool = option(False, help="attend only within a document")
    # the batch
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(16, help="global batch (sequences per optimizer step)")
    micro_batch_size: int | None = option(None, unset="the whole batch", help="sequences per forward/backward; "
                                                                              "batch-size / this = accumulation")
    init_std: float = option(0.006, help="init std of every matrix and embedding (as V3)")
    # DeepSeek-V3 specifics
    balance: str = option("auto", choices=("auto", "bias", "aux", "none"),
                          help="bias: aux-loss-free bias updates + sequence-wise loss α (V3); aux: V2-style balance "
                               "loss only; none; auto: bias where the router selects experts with a bias "
                               "(topk_method noaux_tc), else aux")
    bias_update_rate: float = option(1e-3, help="γ of the bias update per step")
    seq_aux_alpha: float = option(1e-4, help="α of the complementary sequence-wise loss with --balance bias")
    aux_alpha: float = option(1e-2, help="α of the balance loss with --balance aux")
    mtp: bool = option(True, help="train the MTP modules of the preset")
    mtp_lambda: float = option(0.3, help="MTP loss weight λ early in training")
    mtp_lambda_final: float = option(0.1, help="λ after --mtp-lambda-switch of the steps")
    mtp_lambda_switch: float = option(0.7, help="fraction of steps after which λ drops")
    # FP8 (dsv3/fp8/training.py)
    precision: str = option("bf16", choices=("bf16", "fp8"),
                            help="fp8: every GEMM of the decoder's linears and routed experts in E4M3 with "
                                 "fine-grained scales, as DeepSeek-V3 (fast on Hopper GPUs; emulated exactly on CPU); "
                                 "head, router, norms, attention core stay high precision")
    fp8_experts: bool = option(False, help="with --precision fp8: routed experts in FP8 too, through our Triton "
                                           "grouped GEMMs (off by default: slower than bf16 grouped_mm on an H100 so "
                                           "far; measured in docs/fp8.md#fp8-training)")
    fp8_min_dim: int = option(1024, help="with --precision fp8: linears with in or out features below this stay "
                                         "bf16 (their FP8 GEMM does not pay)")
    fp8_ue8m0: bool = option(False, help="with --precision fp8: scales rounded up to powers of two (UE8M0, as "
                                         "DeepSeek-V3.1)")
    # the run
    resume: bool = option(False, help="continue the run in --out from its latest checkpoint")
    eval_every: int = option(100, help="validation every N steps")
    eval_batches: int = option(20, help="validation micro-batches per evaluation")
    save_every: int = option(500, help="checkpoint every N steps; always at the end")
    compile: bool = option(False, help="torch.compile each block (GPU)")
    activation_checkpointing: bool = option(False, help="recompute blocks in backward")
    profile_steps: int = option(0, unset="off", help="torch.profiler over the last N steps: each rank's time per "
                                                     "step in compute and NCCL kernels goes into metrics.jsonl")
    optim: OptimConfig = piece(OptimConfig)
    runtime: RuntimeConfig = piece(RuntimeConfig)
    parallel: ParallelConfig = piece(ParallelConfig)

    def __post_init__(self):
        check(self)
        positive(self, "steps", "batch_size", "seq_len", "eval_batches", "vocab_size")
        mb = self.micro_batch_size or self.batch_size
        if mb <= 0 or self.batch_size % mb:
            raise ValueError(f"micro_batch_size={self.micro_batch_size!r} must divide batch_size={self.batch_size}")
        if self.num_layers and self.init_from:
            raise ValueError(f"num_layers={self.num_layers!r} shapes a new model; --init-from loads one with its own "
                             "layers")
        if not 0 <= self.fim_rate <= 1:
            raise ValueError(f"fim_rate={self.fim_rate!r} must be in [0, 1]")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON file of TrainConfig fields (e.g. a run's run.json); flags given here "
                                    "override it")
    add_flags(p, TrainConfig)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config (if any) overridden by the flags actually given."""
    return options.from_args(TrainConfig, args, read_config(TrainConfig, args.config) if args.config else None)
