"""TrainConfig and the `dsv3 train` argparse block. `--config run.json` repeats a run (every run writes one)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class TrainConfig:
    # model and data
    preset: str = "tiny"
    init_from: str | None = None
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    vocab_size: int = 4096
    model_vocab_size: int = 0  # 0: the tokenizer's size, padded to a multiple of 64
    num_layers: int = 0  # 0: the preset's
    seq_len: int = 256
    fim_rate: float = 0.1
    val_fraction: float = 0.02
    doc_mask: bool = False
    # optimisation
    steps: int = 1000
    batch_size: int = 16
    micro_batch_size: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    init_std: float = 0.006
    # DeepSeek-V3 specifics
    balance: str = "auto"
    bias_update_rate: float = 1e-3
    seq_aux_alpha: float = 1e-4
    aux_alpha: float = 1e-2
    mtp: bool = True
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch: float = 0.7
    # run
    out: str = "runs/train"
    resume: bool = False
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    keep: int = 2
    seed: int = 0
    device: str = "auto"
    param_dtype: str = "fp32"
    autocast: bool | None = None  # None: on for GPU runs, off on CPU (fp32)
    precision: str = "bf16"  # fp8: decoder GEMMs in E4M3 with 1x128 / 128x128 scales (dsv3.train.fp8)
    fp8_experts: bool = False  # with precision fp8: the routed experts' grouped GEMMs too (slower on H100 so far)
    fp8_min_dim: int = 1024  # linears with a side below this stay bf16 (their FP8 GEMM did not pay)
    fp8_ue8m0: bool = False  # power-of-two scales (UE8M0, as DeepSeek-V3.1)
    moments_dtype: str = "fp32"  # bf16: AdamW moments stored in bf16 (DeepSeek-V3), 4 bytes/param saved
    compile: bool = False
    activation_checkpointing: bool = False
    threads: int | None = None
    profile_steps: int = 0  # profile the last N steps: GPU time by kind (compute, NCCL) per rank in metrics.jsonl
    # parallelism (torchrun): data-parallel shards; -1 = every process
    dp_shard: int = -1
    ep: int = 1  # expert-parallel group size: routed experts split over this many consecutive ranks
    pp: int = 1  # pipeline stages' ranks; world / pp data-parallel ranks per stage
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # per micro-batch; 0: as many as stages

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} {why}")

        for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep", "vocab_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        mb = self.micro_batch_size or self.batch_size
        if mb <= 0 or self.batch_size % mb:
            bad("micro_batch_size", f"must divide batch_size={self.batch_size}")
        for name, allowed in (("schedule", ("cosine", "wsd")), ("balance", ("auto", "bias", "aux", "none")),
                              ("param_dtype", ("fp32", "bf16")), ("precision", ("bf16", "fp8")),
                              ("moments_dtype", ("fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {allowed}")
        if self.num_layers and self.init_from:
            bad("num_layers", "shapes a new model; --init-from loads one with its own layers")
        if not 0 <= self.fim_rate <= 1:
            bad("fim_rate", "must be in [0, 1]")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--config", help="JSON file of TrainConfig fields (e.g. a run's run.json); flags given here override it")
    a("--preset", help="model preset for a new model (default tiny)")
    a("--num-layers", type=int, help="decoder layers of a new model (default: the preset's)")
    a("--init-from", help="start from the weights of this checkpoint directory (Hugging Face layout)")
    a("--data", nargs="+", help=".txt / .jsonl (optionally .xz/.gz) files or directories (default: shipped corpus); "
                                "or one run's data/ directory of token files, with that run's --tokenizer")
    a("--tokenizer", help="directory with tokenizer.json to use instead of training a BPE")
    a("--vocab-size", type=int, help="BPE vocabulary size when training a tokenizer (tokens; default 4096)")
    a("--model-vocab-size", type=int,
      help="embedding rows when larger than the tokenizer's (room for added tokens, or a peer's config); "
           "default: the tokenizer's size, padded to a multiple of 64")
    a("--seq-len", type=int, help="training sequence length (tokens; default 256)")
    a("--fim-rate", type=float, help="fraction of documents rewritten fill-in-the-middle (default 0.1)")
    a("--val-fraction", type=float, help="fraction of documents held out for validation (default 0.02)")
    a("--doc-mask", action=argparse.BooleanOptionalAction, help="attend only within a document (default off)")
    a("--steps", type=int, help="optimizer steps (default 1000)")
    a("--batch-size", type=int, help="global batch (sequences per optimizer step; default 16)")
    a("--micro-batch-size", type=int, help="sequences per forward/backward; batch-size / this = accumulation")
    a("--lr", type=float, help="peak learning rate (default 3e-3)")
    a("--min-lr-ratio", type=float, help="final learning rate as a fraction of the peak (default 0.1)")
    a("--warmup", type=int, help="linear warmup (steps; default 100)")
    a("--schedule", choices=("cosine", "wsd"), help="cosine decay, or warmup-stable-decay (default cosine)")
    a("--decay-fraction", type=float, help="wsd: fraction of steps spent decaying at the end (default 0.2)")
    a("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    a("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    a("--init-std", type=float, help="init std of every matrix and embedding (default 0.006, as V3)")
    a("--balance", choices=("auto", "bias", "aux", "none"),
      help="bias: aux-loss-free bias updates + sequence-wise loss α (V3); aux: V2-style balance loss only; none; "
           "auto (default): bias where the router selects with a bias (topk_method noaux_tc), else aux")
    a("--bias-update-rate", type=float, help="γ of the bias update per step (default 1e-3)")
    a("--seq-aux-alpha", type=float, help="α of the complementary sequence-wise loss with --balance bias (1e-4)")
    a("--aux-alpha", type=float, help="α of the balance loss with --balance aux (default 1e-2)")
    a("--mtp", action=argparse.BooleanOptionalAction, help="train the MTP modules of the preset (default on)")
    a("--mtp-lambda", type=float, help="MTP loss weight λ early in training (default 0.3)")
    a("--mtp-lambda-final", type=float, help="λ after --mtp-lambda-switch of the steps (default 0.1)")
    a("--mtp-lambda-switch", type=float, help="fraction of steps after which λ drops (default 0.7)")
    a("--out", help="run directory: checkpoints, metrics.jsonl, plots (default runs/train)")
    a("--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint")
    a("--eval-every", type=int, help="validation every N steps (default 100)")
    a("--eval-batches", type=int, help="validation micro-batches per evaluation (default 20)")
    a("--save-every", type=int, help="checkpoint every N steps (default 500); always at the end")
    a("--keep", type=int, help="checkpoints to keep (default 2)")
    a("--seed", type=int, help="seed of init, data order and FIM (default 0)")
    a("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    a("--param-dtype", choices=("fp32", "bf16"), help="parameter dtype on GPU (default fp32 master weights)")
    a("--autocast", action=argparse.BooleanOptionalAction,
      help="bf16 autocast over the parameters (default: on for GPU, off on CPU; on a CPU with native bf16 "
           "matmuls, such as AVX512-BF16 or AMX, it trains faster)")
    a("--precision", choices=("bf16", "fp8"),
      help="fp8: every GEMM of the decoder's linears and routed experts in E4M3 with fine-grained scales, "
           "as DeepSeek-V3 (fast on Hopper GPUs; emulated exactly on CPU); head, router, norms, attention core "
           "stay high precision (default bf16)")
    a("--fp8-experts", action=argparse.BooleanOptionalAction,
      help="with --precision fp8: routed experts in FP8 too, through our Triton grouped GEMMs (default off: on an "
           "H100 they ran at 0.79-0.89x (Fprop) and 0.43-0.61x (Wgrad) of bf16 grouped_mm)")
    a("--fp8-min-dim", type=int, help="with --precision fp8: linears with in or out features below this stay bf16 "
                                      "(default 1024)")
    a("--fp8-ue8m0", action=argparse.BooleanOptionalAction,
      help="with --precision fp8: scales rounded up to powers of two (UE8M0; default off)")
    a("--moments-dtype", choices=("fp32", "bf16"),
      help="AdamW moment storage: bf16 halves the optimizer state (DeepSeek-V3's setting; default fp32)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile each block (GPU)")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute blocks in backward")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    a("--profile-steps", type=int, help="torch.profiler over the last N steps: each rank's time per step in compute "
                                         "and NCCL kernels goes into metrics.jsonl (default 0: off)")
    a("--dp-shard", type=int, help="under torchrun: data-parallel (FSDP2) ranks; -1 (default) = all processes")
    a("--pp", type=int, help="under torchrun: pipeline stages' ranks (layer ranges as stages); the world size over "
                             "pp is the data-parallel size of each stage (default 1)")
    a("--pp-schedule", choices=("1f1b", "dualpipev"), help="pipeline schedule (default 1f1b; dualpipev: DeepSeek-V3's "
                                                          "bidirectional schedule, two stages per rank)")
    a("--pp-microbatches", type=int, help="pipeline micro-batches per micro-batch (default: the number of stages)")
    a("--ep", type=int, help="under torchrun: expert parallelism, routed experts split over groups of this many "
                             "ranks with all-to-all dispatch (default 1)")


def from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config (if any) overridden by the flags actually given."""
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: --config file not found")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig field(s) {unknown}")
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values)
