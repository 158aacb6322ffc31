"""`dsv3 grpo`: Group Relative Policy Optimization with rule-based rewards (docs/post-training.md#grpo-objective,
#grpo-metrics).

One step = sample G completions for each of `prompts_per_step` prompts with the inference engine → score them →
group-normalised advantages → μ passes of clipped policy-gradient updates over the rollout (in `minibatches`
optimizer steps each) → hand the new weights to the engine.

Design notes
- Weight sync without a checkpoint round trip: on a CPU (fp32) the engine runs the policy module itself; on a
  GPU it runs a bf16 copy that is overwritten in place (CUDA graphs keep pointing at the same storage). Either
  way `Engine.weights_changed()` then gives the prefix cache a new identity and drops its blocks, and the engine
  has no disk tier here, so no latent of old weights is ever reused.
- Log-probs: prompts are left-padded as a separate document (`doc_ids` 0), so attention never sees the padding,
  positions start at each prompt's first token, and every completion starts at the same column. Logits are
  divided by the sampling temperature (TRL's convention), and only completion rows reach the vocabulary.
- π_old = π_θ.detach() when the rollout is used for one optimizer step (μ = 1, one minibatch), as in TRL;
  otherwise a no-grad pass before the updates records it. The frozen reference exists only when β ≠ 0 and is
  refreshed from the policy every `ref_refresh` steps.
- Dynamic sampling (DAPO) drops groups whose rewards are all equal and samples more prompts to refill the
  batch; overlong filtering masks truncated completions out of the loss (they still count in their group's
  statistics).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3 import options
from dsv3.infer.engine import Engine, EngineConfig
from dsv3.infer.llm import run_requests
from dsv3.infer.sampler import SamplingParams
from dsv3.kernels.cross_entropy import cross_entropy
from dsv3.options import add_flags, check, flat_init, option, piece, to_json
from dsv3.rl.evaluate import task_accuracy
from dsv3.rl.loss import AGGREGATIONS, SCALES, group_advantages, policy_loss
from dsv3.rl.plot import plot_rl
from dsv3.rl.policy import load_policy
from dsv3.rl.rewards import build_rewards
from dsv3.rl.tasks import get_task, task_option
from dsv3.train.checkpoint import save_checkpoint
from dsv3.train.config import OptimConfig, RuntimeConfig
from dsv3.train.metrics import MetricsLog
from dsv3.train.optim import build_optimizer, lr_at


# A small learning rate, constant after warmup (wsd with decay_fraction 0).
GRPO_OPTIM = dict(lr=1e-6, warmup=0, schedule="wsd", decay_fraction=0.0, weight_decay=0.0, beta2=0.99)


@flat_init
@dataclass(slots=True)
class GRPOConfig:
    init_from: str = option("", unset="none; needed unless --demo",
                            help="the policy's checkpoint directory (Hugging Face layout + tokenizer), e.g. an SFT "
                                 "run's")
    task: str = task_option("arithmetic")
    rewards: str = option("accuracy=1,format=1", help="NAME[=WEIGHT],...: accuracy, format, overlong, "
                                                      "package.module:function (R1: accuracy + format, equal weight)")
    steps: int = option(100, help="GRPO steps")
    prompts_per_step: int = option(16, help="prompts per step")
    group_size: int = option(8, aliases=("-G",), help="completions per prompt G")
    max_tokens: int = option(256, help="longest completion (tokens)")
    temperature: float = option(1.0, help="sampling temperature")
    top_p: float = option(1.0, help="nucleus sampling")
    beta: float = option(0.0, unset="no reference model",
                         help="KL coefficient β (TRL's default 0; DeepSeekMath 0.04)")
    eps_low: float = option(0.2, help="lower clip ε_low")
    eps_high: float = option(0.2, help="upper clip ε_high (DAPO's clip-higher: 0.28)")
    aggregation: str = option("dapo", choices=AGGREGATIONS, help="loss aggregation")
    scale_rewards: str = option("group", choices=SCALES, help="advantage std scaling")
    mu: int = option(1, help="policy-update passes over each rollout μ")
    minibatches: int = option(1, help="optimizer steps per pass")
    micro_batch_size: int = option(0, unset="a whole minibatch", help="sequences per forward/backward")
    ref_refresh: int = option(0, unset="never", help="reference ← policy every K steps")
    dynamic_sampling: bool = option(False, help="drop groups with equal rewards and sample more prompts (DAPO)")
    max_sampling_rounds: int = option(3, help="with --dynamic-sampling: sampling rounds per step at most")
    overlong_filter: bool = option(True, help="mask truncated completions out of the loss")
    overlong_buffer: int = option(0, help="buffer of the 'overlong' reward (tokens)")
    eval_every: int = option(20, help="held-out greedy accuracy every N steps (0: off)")
    eval_n: int = option(200, help="held-out problems")
    optim: OptimConfig = piece(OptimConfig, **GRPO_OPTIM)
    runtime: RuntimeConfig = piece(RuntimeConfig, out="runs/grpo", keep=1)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        check(self)
        if self.group_size < 2:
            bad("group_size", "must be >= 2: a group of one has no relative advantage")
        for name in ("steps", "prompts_per_step", "max_tokens", "mu", "minibatches", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.temperature <= 0:
            bad("temperature", "must be > 0: GRPO needs sampled, not greedy, completions")
        if self.prompts_per_step * self.group_size % self.minibatches:
            bad("minibatches", f"must divide prompts_per_step × group_size = {self.prompts_per_step * self.group_size}")


@dataclass
class Rollout:
    prompts: list[list[int]]  # (N,) prompt ids, each repeated for its G completions
    completions: list[list[int]]
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    truncated: list[bool]
    stats: dict


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.model, self.tok, self.device = load_policy(cfg.init_from, cfg.runtime)
        self.autocast = cfg.runtime.use_autocast(self.device)
        self.task = get_task(cfg.task)
        self.rewards = build_rewards(cfg.rewards, self.task, cfg.max_tokens, cfg.overlong_buffer)
        # Used in turn, again from the start once each was used (a small task has fewer than a long run asks for).
        self.train_problems = self.task.problems(cfg.steps * cfg.prompts_per_step, cfg.runtime.seed, fewer_ok=True)
        self.heldout = self.task.problems(cfg.eval_n, cfg.runtime.seed, "test") if cfg.eval_every else []
        self.next_problem = 0
        self.opt = build_optimizer(self.model, cfg.optim)
        self.ref = copy.deepcopy(self.model).requires_grad_(False) if cfg.beta else None
        # The engine samples with the policy's own weights: the module itself, or a bf16 copy on a GPU.
        shared = self.device.type == "cpu" or next(self.model.parameters()).dtype == torch.bfloat16
        self.engine_model = self.model if shared else copy.deepcopy(self.model).to(torch.bfloat16)
        n_seqs = min(256, cfg.prompts_per_step * cfg.group_size)
        blocks = n_seqs * (-(-(cfg.max_tokens + 512) // 64) + 1)  # prompts up to 512 tokens; more preempts
        self.engine = Engine(self.engine_model, self.tok, EngineConfig(num_blocks=blocks, max_num_seqs=n_seqs,
                                                                       seed=cfg.runtime.seed))
        self.run_dir = Path(cfg.runtime.out)
        self.step = 0

    # ---- rollout ------------------------------------------------------------------------------------------
    def _problems(self, n: int):
        out = [self.train_problems[(self.next_problem + i) % len(self.train_problems)] for i in range(n)]
        self.next_problem += n
        return out

    def _sample(self, problems):
        cfg, G = self.cfg, self.cfg.group_size
        prompts = [self.tok.apply_chat_template(p.messages(), tokenize=True) for p in problems]
        params = [SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                 seed=hash((cfg.runtime.seed, self.step, self.next_problem, i)) & (2**62 - 1))
                  for i in range(len(problems))]
        self.model.eval()
        with torch.inference_mode():
            outs = run_requests(self.engine, prompts, params, use_tqdm=False)
        comps = [c for o in outs for c in o.outputs]
        reps = [p for p in problems for _ in range(G)]
        total, per_fn = self.rewards([c.text for c in comps], reps, [len(c.token_ids) for c in comps])
        return ([x for x in prompts for _ in range(G)], comps, torch.tensor(total, dtype=torch.float64), per_fn)

    def rollout(self) -> Rollout:
        cfg, G = self.cfg, self.cfg.group_size
        prompts, comps, rewards, per_fn = self._sample(self._problems(cfg.prompts_per_step))
        zero_std = float((rewards.view(-1, G).std(1) == 0).float().mean())
        stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "frac_zero_std": zero_std}
        for name, values in per_fn.items():
            kept = [v for v in values if v is not None]
            stats[f"reward_{name}"] = sum(kept) / max(1, len(kept))
        stats["completion_len_mean"] = sum(len(c.token_ids) for c in comps) / len(comps)
        stats["completion_len_max"] = max(len(c.token_ids) for c in comps)
        stats["truncated_frac"] = sum(c.finish_reason == "length" for c in comps) / len(comps)
        stats["generated_tokens"] = sum(len(c.token_ids) for c in comps)
        if cfg.dynamic_sampling:  # keep groups with a signal; refill from new prompts
            keep = rewards.view(-1, G).std(1) > 0
            groups = [(prompts[g * G:(g + 1) * G], comps[g * G:(g + 1) * G], rewards[g * G:(g + 1) * G])
                      for g in range(len(keep)) if keep[g]]
            rounds = 1
            while len(groups) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
                p2, c2, r2, _ = self._sample(self._problems(cfg.prompts_per_step - len(groups)))
                stats["generated_tokens"] += sum(len(c.token_ids) for c in c2)
                groups += [(p2[g * G:(g + 1) * G], c2[g * G:(g + 1) * G], r2[g * G:(g + 1) * G])
                           for g in range(len(r2) // G) if r2[g * G:(g + 1) * G].std() > 0]
                rounds += 1
            groups = groups[:cfg.prompts_per_step]
            stats["sampling_rounds"] = rounds
            if not groups:
                return Rollout([], [], torch.zeros(0), torch.zeros(0), [], stats)
            prompts = [x for g in groups for x in g[0]]
            comps = [x for g in groups for x in g[1]]
            rewards = torch.cat([g[2] for g in groups])
        adv = group_advantages(rewards, G, cfg.scale_rewards)
        return Rollout(prompts, [c.token_ids for c in comps], rewards, adv,
                       [c.finish_reason == "length" for c in comps], stats)

    # ---- update -------------------------------------------------------------------------------------------
    def _batch(self, ro: Rollout, rows: list[int]):
        """Left-padded (prompt ‖ completion) ids, doc_ids, completion targets and mask for some rollout rows."""
        P = max(len(ro.prompts[i]) for i in rows)
        C = max(len(ro.completions[i]) for i in rows)
        pad = self.tok.eos_id
        ids, docs, targets, mask = [], [], [], []
        for i in rows:
            p, c = ro.prompts[i], ro.completions[i]
            ids.append([pad] * (P - len(p)) + p + c + [pad] * (C - len(c)))
            docs.append([0] * (P - len(p)) + [1] * (len(p) + C))
            targets.append(c + [pad] * (C - len(c)))
            keep = not (self.cfg.overlong_filter and ro.truncated[i])
            mask.append([keep] * len(c) + [False] * (C - len(c)))
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=self.device)  # noqa: E731
        return t(ids), t(docs), t(targets), t(mask, torch.bool), P

    def _logp(self, model, ids, docs, targets, mask, P, entropy: bool = False):
        """(N, C) log-probs of the completion tokens at the sampling temperature (0 where masked)."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = model(ids[:, :-1], doc_ids=docs[:, :-1]).logits[:, P - 1:]  # (N, C, V): column j → token j
        rows = logits[mask].float() / self.cfg.temperature  # (M, V) completion rows only
        logp = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        logp[mask] = -cross_entropy(rows, targets[mask])
        ent = None
        if entropy:
            with torch.no_grad():
                lp = torch.log_softmax(rows, -1)
                ent = float(-(lp.exp() * lp).sum(-1).mean()) if len(rows) else 0.0
        return logp, ent

    def update(self, ro: Rollout) -> dict:
        cfg, N = self.cfg, len(ro.completions)
        mb_size = N // cfg.minibatches if N % cfg.minibatches == 0 else N
        micro = cfg.micro_batch_size or mb_size
        reuse_logp = cfg.mu == 1 and mb_size == N  # one optimizer step per rollout: π_old = π_θ
        self.model.train()
        old = ref = None
        if not reuse_logp or self.ref is not None:
            old, ref = self._recorded_logps(ro, micro, need_old=not reuse_logp)
        sums, n_opt, entropies = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0}, 0, []
        g = torch.Generator().manual_seed(cfg.runtime.seed * 1000003 + self.step)
        for _ in range(cfg.mu):
            order = torch.randperm(N, generator=g).tolist()
            for start in range(0, N, mb_size):
                mb = order[start:start + mb_size]
                n_tok = sum(len(ro.completions[i]) for i in mb if not (cfg.overlong_filter and ro.truncated[i]))
                for s in range(0, len(mb), micro):
                    rows = mb[s:s + micro]
                    ids, docs, targets, mask, P = self._batch(ro, rows)
                    # Entropy is logged from the first microbatch of each step: a sample, at no extra forward.
                    logp, ent = self._logp(self.model, ids, docs, targets, mask, P, entropy=not entropies)
                    if ent is not None:
                        entropies.append(ent)
                    pick = lambda d: self._padded(d, rows, logp.shape[1])  # noqa: E731
                    loss, m = policy_loss(
                        logp, logp.detach() if reuse_logp else pick(old), ro.advantages[rows].to(self.device), mask,
                        ref_logp_NT=pick(ref), beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                        aggregation=cfg.aggregation, max_completion_length=cfg.max_tokens,
                        num_sequences=len(mb), num_tokens=max(n_tok, 1))
                    loss.backward()
                    w = len(rows) / len(mb)
                    sums["loss"] += float(loss.detach())
                    for k in ("clip_low", "clip_high", "kl"):
                        sums[k] += m.get(k, 0.0) * w
                sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                n_opt += 1
        out = {k: v / n_opt for k, v in sums.items()}
        out["entropy"] = entropies[0] if entropies else 0.0
        if not cfg.beta:
            del out["kl"]
        return out

    @torch.no_grad()
    def _recorded_logps(self, ro: Rollout, micro: int, need_old: bool):
        """π_old (before any update of this step) and π_ref log-probs, per row, trimmed to its completion."""
        old, ref = ({} if need_old else None), ({} if self.ref is not None else None)
        for start in range(0, len(ro.completions), micro):
            rows = list(range(start, min(len(ro.completions), start + micro)))
            batch = self._batch(ro, rows)
            for model, store in ((self.model, old), (self.ref, ref)):
                if store is not None:
                    logp = self._logp(model, *batch)[0]
                    store.update({i: logp[k, :len(ro.completions[i])] for k, i in enumerate(rows)})
        return old, ref

    def _padded(self, logps: dict | None, rows: list[int], C: int) -> torch.Tensor | None:
        if logps is None:
            return None
        return torch.stack([torch.nn.functional.pad(logps[i], (0, C - len(logps[i]))) for i in rows])

    def sync_engine(self) -> None:
        if self.engine_model is not self.model:
            with torch.no_grad():
                for dst, src in zip(self.engine_model.state_dict().values(), self.model.state_dict().values()):
                    dst.copy_(src)
        self.engine.weights_changed()

    def evaluate(self) -> dict:
        self.model.eval()
        with torch.inference_mode():
            r = task_accuracy(self.engine, self.task, self.heldout, max_tokens=self.cfg.max_tokens,
                              seed=self.cfg.runtime.seed)
        return {"step": self.step, "eval_accuracy": r["accuracy"], "eval_format_rate": r["format_rate"],
                "eval_mean_length": r["mean_length"]}

    # ---- the run ------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        ro = self.rollout()
        t1 = time.perf_counter()
        rec = {"step": self.step + 1, "lr": lr, **ro.stats}
        if ro.completions:
            rec.update(self.update(ro))
            if self.ref is not None and cfg.ref_refresh and (self.step + 1) % cfg.ref_refresh == 0:
                self.ref.load_state_dict(self.model.state_dict())
            self.sync_engine()
        else:
            rec["skipped"] = "every group had equal rewards"
        t2 = time.perf_counter()
        self.step += 1
        rec.update(time_generate=t1 - t0, time_update=t2 - t1,
                   generate_tokens_per_s=ro.stats["generated_tokens"] / max(t1 - t0, 1e-9))
        return rec

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(to_json(cfg))
        print(f"GRPO on {self.task.name}: {cfg.steps} steps of {cfg.prompts_per_step} prompts × G={cfg.group_size}, "
              f"rewards {cfg.rewards}, aggregation {cfg.aggregation}, scaling {cfg.scale_rewards}, β={cfg.beta}, "
              f"on {self.device}")
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        first = last = self.evaluate() if cfg.eval_every else None
        if first:
            log.write(first)
            print(f"held-out accuracy before GRPO: {first['eval_accuracy']:.3f} ({len(self.heldout)} problems)")
        bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True)
        while self.step < cfg.steps:
            rec = self.train_step()
            log.write(rec)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", len=f"{rec['completion_len_mean']:.0f}",
                            refresh=False)
            bar.update(1)
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                last = self.evaluate()
                log.write(last)
                bar.write(f"step {self.step}: held-out accuracy {last['eval_accuracy']:.3f}")
        bar.close()
        log.close()
        tok_dir = self.run_dir / "tokenizer"
        self.tok.save(tok_dir)
        ckpt = save_checkpoint(self.run_dir, self.step, self.model, self.opt,
                               {"grpo_config": dataclasses.asdict(cfg)}, cfg.runtime.keep, tok_dir)
        return {"steps": self.step, "checkpoint": str(ckpt / "model"), "plot": str(plot_rl(self.run_dir)),
                "accuracy_before": first and first["eval_accuracy"], "accuracy_after": last and last["eval_accuracy"],
                "n_heldout": len(self.heldout)}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true",
                   help="pretrain-or-load tiny → SFT on the task format → GRPO, with held-out accuracy before and "
                        "after, on a laptop CPU (docs/post-training.md#demo), in runs/grpo-demo unless --out; "
                        "flags other than --out, --init-from and --threads are ignored")
    add_flags(p, GRPOConfig)


def from_args(args: argparse.Namespace) -> GRPOConfig:
    return options.from_args(GRPOConfig, args)
