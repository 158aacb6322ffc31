"""`dsv3 train`: raw text -> tokenizer -> token files -> a DeepSeek-V3 model, resumable, with balance and MTP.

One optimizer step = `grad_accum` micro-batches of the global batch. After it, the aux-loss-free bias moves by
the expert loads of the whole global batch (SPEC §9.1); the sequence-wise balance loss enters each MoE layer's
backward with α / grad_accum, so it weighs the same as if the global batch were one forward.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.config import ModelConfig, preset
from dsv3.data.bpe import train_bpe
from dsv3.data.corpus import corpus_fingerprint, read_documents
from dsv3.data.loader import Batch, PackedLoader
from dsv3.data.tokens import build_token_files, is_token_dir, open_token_files, unigram_loss
from dsv3.info import model_stats
from dsv3.io import load_model
from dsv3.model import Transformer
from dsv3.options import to_json
from dsv3.runtime import keep_freed_memory, resolve_device
from dsv3.tokenizer import Tokenizer
from dsv3.train import parallel
from dsv3.train.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from dsv3.train.config import TrainConfig
from dsv3.train.fp8 import apply_fp8
from dsv3.train.metrics import MetricsLog, plot_run, start_profile, time_breakdown
from dsv3.train.objective import (max_violation, mtp_loss, next_token_loss, set_balance_loss,
                                  update_balance_bias)
from dsv3.train.optim import build_optimizer, lr_at, mtp_lambda_at
from dsv3.train.pipeline import build_schedule, forward_only, pipeline_microbatches

H100_BF16_FLOPS = 989e12


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
        self.mesh = parallel.meshes(self.layout, self.device.type) if self.layout.distributed else None
        if self.layout.pp > 1:
            self._pipeline()
        else:
            self._transform(self.model)
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
        return build_token_files(read_documents(cfg.data or None), self.tokenizer, self.run_dir / "data",
                                 corpus_fingerprint(cfg.data or None), cfg.val_fraction, cfg.fim_rate, cfg.runtime.seed)

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
            print(f"training a {self.cfg.vocab_size}-token byte-level BPE on the corpus ...")
            tok = train_bpe(read_documents(self.cfg.data or None), self.cfg.vocab_size)
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
            with self.device:  # initialised where it trains: seconds instead of minutes for billions of weights
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

    def _transform(self, model: torch.nn.Module) -> None:
        """After the pipeline split, on the whole model or on each stage: expert parallelism, activation
        checkpointing, compile (inside each block: DualPipeV refuses compiled stages), FSDP2 (not for a pipeline
        stage alone on its ranks). The model code stays single-device."""
        cfg, lay = self.cfg, self.layout
        if lay.ep > 1:
            parallel.expert_parallel(model, lay, self.mesh)
        for block in parallel.blocks(model):
            if cfg.activation_checkpointing:
                block.forward = _checkpointed(block.forward)
            if cfg.compile:
                block.compile()
        if lay.distributed and (lay.pp == 1 or lay.dp > 1):
            parallel.shard(model, lay, self.mesh)

    def _pipeline(self) -> None:
        """Cut the model into this rank's stages, shard each over its data-parallel ranks, and drop the modules
        other ranks hold (dsv3.train.pipeline)."""
        cfg, lay = self.cfg, self.layout
        # The whole step's batch goes through one schedule step, as (micro-batches x pipeline micro-batches)
        # chunks: the schedule scales the summed gradients once (a second step() would scale the first's again).
        self.n_mb = pipeline_microbatches(cfg.parallel) * cfg.grad_accum
        self.pp_group = self.mesh["pp"]
        self.pp_losses = []  # (main, MTP) per pipeline micro-batch, for the log
        self._n_moe_rows = len(self.model.moe_layers())
        self.schedule, self.stages = build_schedule(
            self.model, lay.pp_rank, lay.pp, self.n_mb, self._pipeline_loss, cfg.parallel.pp_schedule, self.device,
            self.mesh["pp"], cfg.doc_mask, wrap=self._transform)
        owned = {int(i) for m in self.stages for i in m.layers}
        for i in range(len(self.model.layers)):
            if i not in owned:
                self.model.layers[i] = torch.nn.Identity()
        self.first = any(m.embed_tokens is not None for m in self.stages)
        self.last = any(m.lm_head is not None for m in self.stages)
        if not self.first:
            self.model.embed_tokens = None
        if not self.last:
            self.model.norm = self.model.lm_head = None
            self.model.mtp = torch.nn.ModuleList()

    def _pipeline_loss(self, out, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn on the last stage: next-token loss, plus λ · MTP loss when the stage returns MTP
        logits too."""
        logits, mtp_logits = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])
        main = next_token_loss(logits, labels)
        extra = mtp_loss(mtp_logits, labels) if mtp_logits else None
        self.pp_losses.append((main.detach(), extra.detach() if extra is not None else None))
        return main + self.mtp_lam * extra if extra is not None else main

    def _pipeline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch.input_ids, batch.doc_ids) if self.cfg.doc_mask else (batch.input_ids,)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _forward_loss(self, batch, lam: float):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.model(batch.input_ids, doc_ids=batch.doc_ids if self.cfg.doc_mask else None,
                             mtp=len(self.model.mtp) > 0)
        main = next_token_loss(out.logits, batch.labels)
        extra = mtp_loss(out.mtp_logits, batch.labels) if out.mtp_logits else None
        total = main + lam * extra if extra is not None else main
        return total, main, extra, out

    def train_step(self) -> dict:
        cfg, accum = self.cfg, self.cfg.grad_accum
        lr, lam = lr_at(self.step, cfg.optim, cfg.steps), mtp_lambda_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        alpha = {"bias": cfg.seq_aux_alpha, "aux": cfg.aux_alpha, "none": 0.0}[self.balance]
        # Under a pipeline the schedule averages over all its chunks itself: the coefficient stays α.
        set_balance_loss(self.model, alpha / (accum if self.layout.pp == 1 else 1))
        self.mtp_lam = lam
        sums, counts = self._pipeline_accumulate() if self.layout.pp > 1 else self._accumulate(lam)
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

    def _accumulate(self, lam: float) -> tuple[dict, torch.Tensor | None]:
        """Forward and backward over the step's micro-batches (this rank's slices); the balance bias moves with
        the loads of the global batch. -> (losses averaged over ranks, expert loads)."""
        cfg, accum = self.cfg, self.cfg.grad_accum
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        counts = None
        for _ in range(accum):
            batch = self._mine(self.loader.next_batch())
            total, main, extra, out = self._forward_loss(batch, lam)
            (total / accum).backward()
            sums["loss"] += main.detach() / accum
            if extra is not None:
                sums["mtp_loss"] += extra.detach() / accum
            if out.balance_loss is not None:
                sums["balance_loss"] += out.balance_loss / accum
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        if self.layout.distributed:
            counts = counts if counts is None else parallel.all_sum(counts, self.layout)
            sums = {k: parallel.all_sum(torch.as_tensor(v, device=self.device, dtype=torch.float32),
                                        self.layout) / self.layout.dp for k, v in sums.items()}
        if counts is not None and self.balance == "bias":
            update_balance_bias(self.model, counts, cfg.bias_update_rate)
        return sums, counts

    def _pipeline_accumulate(self) -> tuple[dict, torch.Tensor | None]:
        """This rank's slice of the step's batch through its pipeline's schedule. The losses live on the last
        stage's ranks; each stage fills its rows of the model's load table, summed over all ranks (stages and
        data-parallel slices), and moves its layers' balance biases by the global loads."""
        cfg, lay = self.cfg, self.layout
        parts = [self.loader.next_batch() for _ in range(cfg.grad_accum)]
        batch = self._mine(Batch(*(torch.cat([getattr(b, f) for b in parts])
                                   for f in ("input_ids", "labels", "doc_ids"))))
        self.pp_losses.clear()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            self.schedule.step(*(self._pipeline_inputs(batch) if self.first else ()),
                               **({"target": batch.labels} if self.last else {}))
        keys = ["loss", "balance_loss"] + (["mtp_loss"] if self.model.config.num_nextn_predict_layers else [])
        sums = {k: torch.zeros((), device=self.device) for k in keys}  # all_sum works in place: one tensor each
        mine = self.pp_losses[-self.n_mb:]
        if mine:  # the last stage's ranks: the mean over the pipeline micro-batches
            sums["loss"] = torch.stack([m for m, _ in mine]).mean()
            if "mtp_loss" in sums:
                sums["mtp_loss"] = torch.stack([x for _, x in mine]).mean()
        table = torch.zeros(self._n_moe_rows, self.arch.n_routed_experts, device=self.device, dtype=torch.int64)
        for stage in self.stages:
            loads, bal = stage.take_loads(self.n_mb)
            if loads is not None:
                table[stage.moe_rows] = loads
                sums["balance_loss"] = sums["balance_loss"] + (bal if bal is not None else 0.0)
        sums = {k: parallel.all_sum(v.float(), lay) / lay.dp for k, v in sums.items()}
        if not self._n_moe_rows:
            return sums, None
        table = parallel.all_sum(table, lay)
        if self.balance == "bias":
            for stage in self.stages:
                if stage.moe_rows:
                    update_balance_bias(stage, table[stage.moe_rows], cfg.bias_update_rate)
        return sums, table

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
            batch = self._mine(batch)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                if self.layout.pp > 1:  # the logits only on the last stage's ranks (a 0 elsewhere: all_sum below)
                    out = forward_only(self.stages, self._pipeline_inputs(batch), self.layout.pp_rank,
                                       self.layout.pp, self.cfg.parallel.pp_schedule, self.pp_group)
                    logits = out[0] if isinstance(out, tuple) else out
                else:
                    logits = self.model(batch.input_ids, doc_ids=batch.doc_ids if self.cfg.doc_mask else None).logits
            losses.append(next_token_loss(logits, batch.labels).float() if logits is not None
                          else torch.zeros((), device=self.device))
        self.model.train()
        val = (parallel.all_sum(torch.stack(losses).mean(), self.layout) / self.layout.dp).item()
        return {"step": self.step, "val_loss": val, "val_ppl": math.exp(val), "unigram_loss": self.unigram}

    def _mine(self, batch: Batch) -> Batch:
        """This rank's slice of a global micro-batch, on its device."""
        if self.layout.distributed:
            part = self.layout.slice(len(batch.input_ids))
            batch = Batch(batch.input_ids[part], batch.labels[part], batch.doc_ids[part])
        return batch.to(self.device)

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
        cuda = self.device.type == "cuda"
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
                if cuda:
                    rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / H100_BF16_FLOPS
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


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
