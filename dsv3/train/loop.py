"""`dsv3 train`: raw text -> tokenizer -> token files -> a DeepSeek-V3 model, resumable, with balance and MTP.

One optimizer step = `grad_accum` micro-batches of the global batch, run forward and backward by a step
strategy (dsv3/train/step.py: the whole model, or this rank's pipeline stages). After it, the aux-loss-free bias
moves by the expert loads of the whole global batch (docs/architecture.md#auxiliary-loss-free-balancing); the
sequence-wise balance loss weighs the same as if the global batch were one forward.
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.config import ModelConfig, preset
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import corpus_fingerprint, read_documents
from dsv3.data.loader import Batch, PackedLoader
from dsv3.data.tokens import build_token_files, is_token_dir, open_token_files, unigram_loss
from dsv3.fp8 import apply_fp8
from dsv3.info import model_stats
from dsv3.io import load_model
from dsv3.model import Transformer
from dsv3.options import to_json
from dsv3.runtime import keep_freed_memory, resolve_device
from dsv3.tokenizer import Tokenizer
from dsv3.train import parallel
from dsv3.train.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from dsv3.train.config import TrainConfig
from dsv3.train.metrics import MetricsLog, peak_flops, plot_run, start_profile, time_breakdown
from dsv3.train.objective import max_violation, next_token_loss, set_balance_loss
from dsv3.train.optim import build_optimizer, lr_at, mtp_lambda_at
from dsv3.train.step import PipelineStep, PlainStep, rank_batch


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.runtime.out)
        existing = checkpoints(self.run_dir)
        if existing and not cfg.resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints; pass --resume to continue it, or choose "
                             "another --out (nothing was overwritten)")
        if cfg.resume and not existing:
            raise ValueError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        self.arch = ModelConfig.from_json(cfg.init_from) if cfg.init_from else preset(cfg.preset)
        if cfg.num_layers:
            self.arch = self.arch.replace(num_hidden_layers=cfg.num_layers)
        self.layout = parallel.init(cfg, self.arch.n_routed_experts, self.arch.num_hidden_layers)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = resolve_device(cfg.runtime.device)
        if self.device.type == "cuda" and self.layout.distributed:
            self.device = torch.device("cuda", self.layout.local_rank)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.autocast = cfg.runtime.use_autocast(self.device)
        if self.layout.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                (self.run_dir / "run.json").write_text(to_json(cfg))
        for turn in ("main", "others") if self.layout.distributed else ("main",):  # rank 0 trains and writes the
            if (turn == "main") == self.layout.main:  # tokenizer and token files, the others then read them
                self.tokenizer = self._tokenizer()
                self.train_tokens, self.val_tokens = self._token_files()
            parallel.barrier(self.layout)
        self.unigram = unigram_loss(self.train_tokens, self.val_tokens, self.tokenizer.vocab_size)
        self.model = self._model()
        self.strategy = self._strategy()
        self.opt = build_optimizer(self.model, cfg.optim)
        mb = cfg.micro_batch_size or cfg.batch_size
        self.loader = PackedLoader(self.train_tokens, cfg.seq_len, mb, cfg.runtime.seed, self.tokenizer.bos_id)
        self.val_loader = PackedLoader(self.val_tokens, cfg.seq_len, mb, cfg.runtime.seed, self.tokenizer.bos_id,
                                       shuffle=False)
        self.step = 0
        if cfg.resume:
            manifest = load_checkpoint(existing[-1], self.model, self.opt)
            self.loader.load_state_dict(manifest["loader"])
            self.step = manifest["step"]
        self.log = MetricsLog(self.run_dir / "metrics.jsonl" if self.layout.main else None,
                              self.step if cfg.resume else None)
        self.flops_per_token = model_stats(self.model.config, cfg.seq_len)["training_flops_per_token"]

    # ---- setup -----------------------------------------------------------------------------------------
    @property
    def _token_dir(self) -> str | None:
        """--data is one directory of token files built before (a run's data/): train on those as they are."""
        data = self.cfg.data
        return data[0] if len(data) == 1 and is_token_dir(data[0]) else None

    def _token_files(self):
        cfg = self.cfg
        if self._token_dir:
            return open_token_files(self._token_dir, self.tokenizer)
        data = cfg.data or None
        return build_token_files(read_documents(data, cfg.text_column), self.tokenizer, self.run_dir / "data",
                                 corpus_fingerprint(data, cfg.text_column), cfg.val_fraction, cfg.fim_rate,
                                 cfg.runtime.seed)

    def _tokenizer(self) -> Tokenizer:
        out = self.run_dir / "tokenizer"
        if (out / "tokenizer.json").is_file():  # resuming, or a rerun that already trained it
            return Tokenizer.from_dir(out)
        if self.cfg.tokenizer:
            tok = Tokenizer.from_dir(self.cfg.tokenizer)
        elif self._token_dir:
            raise ValueError(f"--data {self._token_dir} holds token files: pass the tokenizer they were built with "
                             "(--tokenizer RUN/tokenizer)")
        else:
            documents = read_documents(self.cfg.data or None, self.cfg.text_column)  # bad paths and files fail here
            print(f"training a {self.cfg.vocab_size}-token byte-level BPE on the corpus ...")
            tok = train_bpe(documents, self.cfg.vocab_size)
        tok.save(out)
        return tok

    def _model(self) -> Transformer:
        cfg = self.cfg
        torch.manual_seed(cfg.runtime.seed)
        dtype = cfg.runtime.dtype(self.device)
        arch = self.arch
        biased = arch.topk_method == "noaux_tc"  # the router adds e_score_correction_bias to select experts
        self.balance = cfg.balance if cfg.balance != "auto" else "bias" if biased else "aux"
        if self.balance == "bias" and not biased:  # checked before any weights are allocated
            raise ValueError(f"--balance bias needs a router that selects experts with a bias (topk_method "
                             f"'noaux_tc'); this model routes with topk_method={arch.topk_method!r}: "
                             "use --balance aux or none")
        if cfg.init_from:
            model = load_model(cfg.init_from, device=self.device, dtype=dtype)  # its config.json wins
        else:
            mcfg = arch.with_vocab(max(self.tokenizer.vocab_size, cfg.model_vocab_size))
            with self.device:  # initialised where it trains: no CPU init and copy of billions of weights
                model = Transformer(mcfg if cfg.mtp else mcfg.replace(num_nextn_predict_layers=0))
                model.init_weights(std=cfg.init_std)
            model = model.to(dtype=dtype)
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                             f"{self.tokenizer.vocab_size} ids")
        if not cfg.mtp and model.config.num_nextn_predict_layers:
            model.mtp = torch.nn.ModuleList()
            model.config = model.config.replace(num_nextn_predict_layers=0)
        if cfg.precision == "fp8":
            apply_fp8(model, experts=cfg.fp8_experts, ue8m0=cfg.fp8_ue8m0, min_dim=cfg.fp8_min_dim)
        return model.train()

    def _strategy(self) -> PlainStep | PipelineStep:
        """How a step runs forward and backward on this rank (dsv3/train/step.py), after the model's transforms
        (dsv3/train/parallel.py: on the whole model, or on each pipeline stage after the split)."""
        cfg, lay = self.cfg, self.layout
        mesh = parallel.meshes(lay, self.device.type) if lay.distributed else None
        wrap = partial(parallel.apply_parallelism, layout=lay, mesh=mesh, checkpointing=cfg.activation_checkpointing,
                       compile=cfg.compile)
        common = dict(layout=lay, device=self.device, autocast=self.autocast, doc_mask=cfg.doc_mask,
                      bias_rate=cfg.bias_update_rate if self.balance == "bias" else None)
        if lay.pp > 1:
            return PipelineStep(self.model, par=cfg.parallel, grad_accum=cfg.grad_accum, pp_group=mesh["pp"],
                                wrap=wrap, **common)
        wrap(self.model)
        return PlainStep(self.model, **common)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        lr, lam = lr_at(self.step, cfg.optim, cfg.steps), mtp_lambda_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        alpha = {"bias": cfg.seq_aux_alpha, "aux": cfg.aux_alpha, "none": 0.0}[self.balance]
        set_balance_loss(self.model, self.strategy.balance_coef(alpha, cfg.grad_accum))
        batches = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
        sums, counts = self.strategy.accumulate(batches, lam)
        parallel.scale_expert_grads(self.model, self.layout)
        grad_norm = parallel.clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip, self.layout, self.opt)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        rec = {"step": self.step, "lr": lr, "grad_norm": float(grad_norm)}
        rec.update({k: float(v) for k, v in sums.items() if torch.is_tensor(v)})
        if self.model.config.num_nextn_predict_layers:
            rec["mtp_lambda"] = lam
        if counts is not None:
            rec["maxvio"] = [round(v, 4) for v in max_violation(counts).tolist()]
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = []
        for batch in self.val_loader.eval_batches(self.cfg.eval_batches):
            if len(batch.input_ids) % self.layout.dp:  # a short last batch: keep what every rank can share
                keep = len(batch.input_ids) // self.layout.dp * self.layout.dp
                if not keep:
                    break
                batch = Batch(batch.input_ids[:keep], batch.labels[:keep], batch.doc_ids[:keep])
            batch = rank_batch(batch, self.layout, self.device)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                logits = self.strategy.eval_logits(batch)
            # Under a pipeline the logits exist on the last stage's ranks only: a 0 elsewhere (all_sum below).
            losses.append(next_token_loss(logits, batch.labels).float() if logits is not None
                          else torch.zeros((), device=self.device))
        self.model.train()
        val = (parallel.all_sum(torch.stack(losses).mean(), self.layout) / self.layout.dp).item()
        return {"step": self.step, "val_loss": val, "val_ppl": math.exp(val), "unigram_loss": self.unigram}

    def save(self, last_eval: dict | None = None) -> Path:
        manifest = {"train_config": dataclasses.asdict(self.cfg), "loader": self.loader.state_dict(),
                    "eval": last_eval}
        return save_checkpoint(self.run_dir, self.step, self.model, self.opt, manifest, self.cfg.runtime.keep,
                               self.run_dir / "tokenizer", self.layout)

    # ---- the run -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len
        n_params = sum(p.numel() for p in self.model.parameters())
        main = self.layout.main
        if main:
            lay = self.layout
            ranks = (f" x {lay.world} processes (pipeline {lay.pp} x data-parallel {lay.dp}, expert-parallel "
                     f"{lay.ep})" if lay.distributed else "")
            print(f"{cfg.preset if not cfg.init_from else cfg.init_from}: {n_params / 1e6:.1f}M parameters, "
                  f"{len(self.train_tokens):,} training tokens, batch {cfg.batch_size} x {cfg.seq_len} "
                  f"(accumulation {cfg.grad_accum}), {cfg.steps} steps on {self.device}{ranks}")
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not main)
        last_eval, ckpt, prof, timing = None, None, None, None
        cuda, peak = self.device.type == "cuda", peak_flops(self.device)  # no peak known: no MFU
        try:
            while self.step < cfg.steps:
                if cfg.profile_steps and self.step == max(cfg.steps - cfg.profile_steps, 0):
                    prof, t_prof, t_prof_step = start_profile(self.device), time.perf_counter(), self.step
                t0 = time.perf_counter()
                rec = self.train_step()
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = tokens_per_step / dt
                if peak:
                    rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / peak
                if prof is not None:
                    rec["profiled"] = True
                    if self.step == cfg.steps:
                        timing = time_breakdown(prof, cfg.steps - t_prof_step, time.perf_counter() - t_prof, cuda)
                self.log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:,.0f}",
                                refresh=False)  # update() redraws, at most every 0.1 s
                bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = self.evaluate()
                    self.log.write(last_eval)
                    if main:
                        bar.write(f"step {self.step}: val loss {last_eval['val_loss']:.4f} "
                                  f"(ppl {last_eval['val_ppl']:.1f}; unigram {self.unigram:.4f})")
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    ckpt = self.save(last_eval)
            self._log_ranks(timing)
        except KeyboardInterrupt:
            bar.close()
            if main:
                print(f"\ninterrupted: saving step {self.step} ...")
            if self.step:
                print(f"saved {self.save(last_eval)}; continue with --resume --out {self.run_dir}")
            raise SystemExit(130)
        finally:
            bar.close()
            self.log.close()
        plot = plot_run(self.run_dir) if main else None
        return {"step": self.step, "val_loss": last_eval and last_eval["val_loss"], "unigram_loss": self.unigram,
                "checkpoint": str(ckpt / "model") if ckpt else None, "plot": str(plot)}

    def _log_ranks(self, timing: dict | None) -> None:
        """One record with every rank's peak memory (GPU: allocated by torch; CPU: the process's peak RSS) and,
        with --profile-steps, its time breakdown."""
        if self.device.type == "cuda":
            mine = {"peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
        else:
            import resource
            mine = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        mine.update(timing or {})
        ranks = [mine]
        if self.layout.distributed:
            ranks = [None] * self.layout.world
            torch.distributed.all_gather_object(ranks, mine)
        self.log.write({"step": self.step, "ranks": ranks})
