"""The inference engine: requests in, streamed completions out, over a paged latent KV cache.

`step()` = schedule (which sequences, how many tokens) → one forward of the flat batch through the model with
the cache → sample the sequences that reached their last known token → detokenize, check stops, free what
finished. Requests join and leave between any two steps. The server, `dsv3 generate`, `LLM` and GRPO's
sampling all drive this one loop.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dsv3.infer.cuda_graphs import DecodeRunner, fused_pieces
from dsv3.infer.detokenizer import IncrementalDetokenizer
from dsv3.infer.kv_cache import BlockPool, allocate_pools, bytes_per_token, default_cache_bytes
from dsv3.infer.paged_kv import ABSORBED_MAX_QUERY, PagedKV, to_device
from dsv3.infer.prefix_cache import SpillStore
from dsv3.infer.sampler import SamplingParams, TokenLogprobs, choose, sample
from dsv3.infer.scheduler import Scheduler, Sequence
from dsv3.infer.speculative import accept_greedy, propose, verify
from dsv3.infer.transform import prepare_for_engine
from dsv3.model import Transformer
from dsv3.runtime import keep_freed_memory
from dsv3.tokenizer import Tokenizer


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 64  # tokens per cache block (= the context-cache unit of the server)
    num_blocks: int | None = None  # None: from cache_memory_fraction of the free memory, at most what
    # max_num_seqs sequences of full context need
    cache_memory_fraction: float = 0.8  # of free GPU memory (or available host memory on a CPU)
    max_num_seqs: int = 256  # sequences in one forward
    max_batched_tokens: int = 2048  # tokens in one forward (prefill chunks + decode tokens)
    seed: int = 0  # of the generators of requests that give no seed
    speculative_tokens: int = 0  # MTP drafts per step (0: off; 1: V3's one MTP module,
    # docs/architecture.md#mtp-at-inference)
    host_cache_bytes: int = 0  # prefix-cache blocks evicted from the pool are kept in host memory up to this
    disk_cache_dir: str | None = None  # ... and then on disk here, across restarts (None: no disk tier)
    disk_cache_bytes: int = 16 << 30
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (GPU only; off: eager, for debugging)
    overlap: bool | None = None  # launch a plain decode step before reading back the previous one's tokens
    # (see Engine.step); None: on with CUDA graphs

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.speculative_tokens not in (0, 1):
            raise ValueError(f"speculative_tokens={self.speculative_tokens}: 0 (off) or 1 (one MTP draft per step)")
        if not 0 < self.cache_memory_fraction <= 1:
            raise ValueError(f"cache_memory_fraction={self.cache_memory_fraction} must be in (0, 1]")


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything emitted so far
    token_ids: list[int]
    delta_text: str = ""  # emitted in this step
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    finished: bool


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 model_id: str | None = None):
        self.model, self.tokenizer = prepare_for_engine(model.eval()), tokenizer
        self.config = cfg = config or EngineConfig()
        mcfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            keep_freed_memory()
        self.max_len = mcfg.max_position_embeddings
        if cfg.speculative_tokens > len(model.mtp):
            raise ValueError(f"speculative_tokens={cfg.speculative_tokens} needs MTP modules; this model has "
                             f"{len(model.mtp)}")
        self.spec = cfg.speculative_tokens
        self.drafted = self.accepted = 0  # draft tokens proposed / accepted
        per_block = bytes_per_token(mcfg, self.dtype, extra_layers=self.spec) * cfg.block_size
        enough = cfg.max_num_seqs * -(-self.max_len // cfg.block_size)
        by_memory = default_cache_bytes(self.device, cfg.cache_memory_fraction) // per_block
        num_blocks = cfg.num_blocks or min(enough, by_memory)
        # The prefix cache is only sound between identical models: name it by the config and the weights' shapes
        # and a fingerprint of a few values (cheap; a different checkpoint of the same shape differs there).
        self.model_id = model_id = model_id or _fingerprint(model)
        self.weights_version = 0
        self.pool = BlockPool(num_blocks, cfg.block_size, model_id)
        # MTP module k's latents live in pool L + k - 1; block `num_blocks` is the scratch block of CUDA graphs.
        self.kv = allocate_pools(mcfg, num_blocks + 1, cfg.block_size, mcfg.num_hidden_layers + self.spec,
                                 self.dtype, self.device)
        runner = dict(kv=self.kv, scratch=num_blocks, max_rows=min(cfg.max_num_seqs * (1 + self.spec),
                      cfg.max_batched_tokens), max_blocks=-(-self.max_len // cfg.block_size) + 1,
                      graphs=cfg.cuda_graphs)
        self._decode = DecodeRunner(self._main_rows, **runner)
        self._decode_mtp = DecodeRunner(self._mtp_rows, hidden_size=mcfg.hidden_size, **runner) if self.spec else None
        self.store = None
        if cfg.host_cache_bytes > 0 or cfg.disk_cache_dir:
            self.store = SpillStore(self.kv, model_id, cfg.host_cache_bytes, cfg.disk_cache_dir, cfg.disk_cache_bytes)
            self.pool.spill = self.store.put
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, cfg.max_batched_tokens, self.store)
        self.requests: dict[str, list[Sequence]] = {}
        self.overlap = cfg.overlap if cfg.overlap is not None else self._decode.graphs
        # A step whose sequences each bring at most this many new tokens runs as absorbed rows (`_decode`: a CUDA
        # graph on a GPU). With graphs that takes in whole prompts shorter than a block and the tail a prompt
        # recomputes after a prefix-cache hit: a prefill step costs far more host time than a graph replay
        # (measured: docs/inference.md#prefix-cache). Without graphs only decode and draft-check rows do.
        self.absorbed_max_query = cfg.block_size if self._decode.graphs else ABSORBED_MAX_QUERY
        self._ahead: _Ahead | None = None  # a decode step launched whose tokens are not read back yet
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._next_id = itertools.count()

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_len}")
        if (bad := [t for t in ids if not 0 <= t < self.model.config.vocab_size]):
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.model.config.vocab_size - 1})")
        request_id = request_id or f"req-{next(self._next_id)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        seqs = []
        for i in range(params.n):
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (), generator=self._rng))
            g = torch.Generator(self.device).manual_seed(hash((seed, i)) & (2**62 - 1))
            seq = Sequence(request_id, i, ids, params, g, wait_for=seqs[0] if seqs else None)
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
            seq.matcher = params.grammar.matcher() if params.grammar is not None else None
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now; its blocks go back to the pool at once."""
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def weights_changed(self) -> None:
        """The model's weights were updated in place (RL, a new checkpoint): cached prefixes of the old weights
        must never serve the new ones, so the cache identity gets a new version (weights hash + version:
        docs/api.md#context-caching)."""
        if self.has_unfinished():
            raise RuntimeError("weights_changed() while requests run: finish or abort them first")
        self.weights_version += 1
        name = f"{self.model_id}:v{self.weights_version}"
        self.pool.rename(name)
        if self.store is not None:
            self.store.rename(name)

    def warmup(self) -> None:
        """Record every decode CUDA graph, and compile the prefill's pieces, now rather than at the first step that
        needs them (GPU; else nothing). Without it a request waits for torch.compile (measured:
        docs/inference.md#cuda-graphs) at the first prefill, and again at the first of each range of token counts
        that the MoE's code branches on (routing and sorting methods): prompts of 7, 16, 32, ... tokens up to a
        full prefill chunk go through once, and the prefix cache forgets them."""
        if not self._decode.graphs:
            return
        with torch.inference_mode():
            for runner in (self._decode, self._decode_mtp):
                if runner is not None:
                    runner.capture_all()
        longest = min(self.config.max_batched_tokens, self.max_len, self.pool.num_blocks * self.config.block_size) - 3
        sizes = [7] + [n for n in (2 ** i for i in range(4, 16)) if n < longest] + [longest]
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        self.absorbed_max_query, short = ABSORBED_MAX_QUERY, self.absorbed_max_query  # the prefill path
        try:
            for n in sizes:
                rid = self.add_request([2 + i % 100 for i in range(n)], params, "dsv3-warmup")
                while rid in self.requests:
                    self.step()
                self.pool.rename(self.pool.model_id)  # forgotten: the next prompt computes all of its tokens
        finally:
            self.absorbed_max_query = short
        self.pool.hits = self.pool.queries = 0
        self.drafted = self.accepted = 0

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def flush_cache(self) -> None:
        """Every cached full block to the disk tier (graceful shutdown: the next start finds them)."""
        if self.store is None:
            return
        for b, h in enumerate(self.pool.hash):
            if h is not None:
                self.store.put(b, h)
        self.store.flush()

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward of the running batch -> what each request gained. With `overlap`, while every running
        sequence is a plain decode (nothing waiting, no penalties, logprobs, grammar or drafts), each call first
        launches the next decode step, its input tokens taken on the device from the step launched last call, and
        only then reads that step's tokens back and does the host's work on them (detokenize, stops, outputs): on a
        GPU that work overlaps the forward instead of leaving the GPU idle. A sequence that stops on a token
        (EOS, a stop string) has one wasted row in the step launched meanwhile; one that reaches max_tokens is
        left out of it. Tokens are those of the plain loop: the same rows, in the same order, from the same
        generators."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._launch_ahead(ahead)
            return self._read_ahead(ahead)
        outs = self._step()
        self._launch_ahead(None)
        return outs

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_work():
                raise RuntimeError("the KV cache cannot hold a single sequence: raise num_blocks")
            return []
        pairs = list(zip(batch.seqs, batch.query_lens))
        ends = [s for s, n in pairs if s.num_computed + n == s.num_tokens]  # these sample (or verify) now
        logits, hidden, rows = self._forward(pairs, ends)
        new = self._decide(ends, logits, rows)
        valid = {}
        for seq, n in pairs:  # rejected draft rows are not part of the cache (they get overwritten later)
            valid[seq.seq_id] = n - (len(seq.draft) + 1 - len(new[seq.seq_id][0]) if seq.seq_id in new else 0)
            self.scheduler.computed(seq, valid[seq.seq_id])
        appended: dict[int, list[int]] = {}
        for seq in ends:
            seq.draft, seq.draft_q = [], None
            for tok, lp in zip(*new[seq.seq_id]):
                if not seq.finished:  # a stop inside an accepted draft drops what follows it
                    self._append(seq, tok, lp)
                    appended.setdefault(seq.seq_id, []).append(tok)
        if self.spec:
            self._draft(pairs, valid, hidden)
        return self._outputs(dict.fromkeys(s.request_id for s in batch.seqs), appended)

    @torch.inference_mode()
    def _launch_ahead(self, prev: _Ahead | None) -> None:
        """Launch a decode step of the running sequences (see `step`): after a plain step (`prev` None) on their
        last tokens, or on the tokens of `prev`, still on the device, one position further."""
        if not self.overlap or self.spec or self.scheduler.waiting or not self.scheduler.running:
            return
        pending = prev is not None  # prev's tokens are not in all_ids yet
        batch, rows = [], []
        for s in self.scheduler.running:
            p = s.params
            if (s.in_prefill or s.draft or s.matcher is not None or p.logprobs is not None or p.has_penalties
                    or len(s.output_ids) < p.min_tokens or (pending and s not in prev.index)):
                return
            if pending and ((p.max_tokens is not None and len(s.output_ids) + 1 >= p.max_tokens)
                            or len(s.all_ids) + 1 >= self.max_len):
                continue  # prev's token is its last
            batch.append(s)
            rows.append(prev.index[s] if pending else None)
        bs, pos, slots = self.config.block_size, [], []
        for s in batch:
            q = s.num_computed + pending  # the input token's position
            if not self.scheduler.reserve(s, q + 1):
                return  # the pool is full: the plain loop preempts
            pos.append(q)
            slots.append(s.blocks[q // bs] * bs + q % bs)
        if not batch:
            return
        if pending:
            ids = prev.tokens if rows == list(range(len(prev.seqs))) else prev.tokens[to_device(rows, self.device)]
        else:
            ids = [s.all_ids[-1] for s in batch]
        logits, _ = self._decode(ids, pos, slots, [s.blocks for s in batch], [q + 1 for q in pos])
        tokens = choose(logits, [s.params for s in batch], [s.prompt_ids for s in batch],
                        [s.output_ids for s in batch], [s.generator for s in batch], self.tokenizer.eos_id)
        self._ahead = _Ahead(batch, tokens)

    def _read_ahead(self, a: _Ahead) -> list[RequestOutput]:
        appended = {}
        for s, tok in zip(a.seqs, a.host_list()):
            if not s.finished:  # (aborted, or stopped on the token before: a wasted row)
                self.scheduler.computed(s, 1)
                self._append(s, tok, None)
                appended[s.seq_id] = [tok]
        return self._outputs(dict.fromkeys(s.request_id for s in a.seqs), appended)

    @torch.inference_mode()
    def _forward(self, pairs, ends):
        """The main model over the flat batch: logits of the rows that sample or verify, all hidden states, and
        each such sequence's logits rows."""
        spans = [(s, s.num_computed, n) for s, n in pairs]
        want, rows, logit_rows, start = {s.seq_id for s in ends}, {}, [], 0
        for seq, n in pairs:
            start += n
            if seq.seq_id in want:  # the last 1 + len(draft) rows: the next token, then one per draft token
                k = 1 + len(seq.draft)
                rows[seq.seq_id] = list(range(len(logit_rows), len(logit_rows) + k))
                logit_rows += range(start - k, start)
        if self._absorbed([n for _, n in pairs]):  # a decode step: CUDA graph on a GPU
            logits, hidden = self._decode(*self._rows(spans))
            if logit_rows != list(range(len(logits))):  # (plain decode steps want every row, in order)
                logits = logits[to_device(logit_rows, self.device)]
            return logits, hidden, rows
        ids, pos, slots, tables = self._flat(spans)
        cache = PagedKV(self.kv, slots, tables, [s.num_computed + n for s, n in pairs], [n for _, n in pairs],
                        to_device(logit_rows, self.device))
        with self._fused():
            out = self.model(ids, positions=pos, cache=cache)
        return out.logits, out.hidden, rows

    def _absorbed(self, query_lens: list[int]) -> bool:
        """Whether a step of these new-token counts (one per sequence) runs as absorbed rows (`_decode`)."""
        return max(query_lens) <= self.absorbed_max_query and (
            max(query_lens) <= ABSORBED_MAX_QUERY or sum(query_lens) <= self._decode.max_rows)

    def _rows(self, spans, shift=0):
        """Host lists of the flat batch, one entry per token of `n` tokens of each sequence from position `start`,
        for (seq, start, n) in `spans`: its token id (the token `shift` places later in prompt + output + draft),
        position, cache slot, block table and the cache rows it sees."""
        bs, ids, pos, slots, tables, lens = self.config.block_size, [], [], [], [], []
        for seq, c, n in spans:
            a, b, known = c + shift, c + n + shift, len(seq.all_ids)
            ids += seq.all_ids[a:b] if b <= known else seq.all_ids[a:] + seq.draft[max(a - known, 0):b - known]
            pos += range(c, c + n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(c, c + n)]
            tables += [seq.blocks] * n
            lens += range(c + 1, c + n + 1)
        return ids, pos, slots, tables, lens

    def _flat(self, spans, shift=0):
        """Token ids, positions, cache slots and block tables (one per sequence) of the flat batch, on device."""
        ids, pos, slots, _, _ = self._rows(spans, shift)
        tables = [s.blocks for s, _, _ in spans]
        width = max(map(len, tables))
        tables = [t + [0] * (width - len(t)) for t in tables]  # padding is masked out
        return tuple(to_device(x, self.device) for x in (ids, pos, slots, tables))

    def _fused(self):
        """Prefill on a GPU runs the same torch.compile'd pieces that the decode graphs record (far fewer kernel
        launches: a step's host time is what a prefix-cache hit waits for)."""
        return fused_pieces() if self._decode.graphs else nullcontext()

    def _main_rows(self, cache, ids, pos, _):
        out = self.model(ids, positions=pos, cache=cache)
        return out.logits, out.hidden  # in the model's dtype: the sampler reads them once

    def _mtp_rows(self, cache, ids, pos, hidden):
        return (self.model.draft(ids, hidden, pos, cache).float(),)

    def _decide(self, ends, logits, rows) -> dict[int, tuple[list[int], list]]:
        """The tokens each sequence gains: a plain sample, or the outcome of verifying its draft."""
        # One batched sample (one host sync) covers plain rows and greedy verification: a greedy draft's rows are
        # the main model's choice at its place and, given it, the token after it.
        batch = [s for s in ends if not s.draft or s.params.greedy]
        picks = [(s, i) for s in batch for i in range(1 + len(s.draft))]
        new = {}
        if picks:
            want = [rows[s.seq_id][i] for s, i in picks]
            chosen = logits if want == list(range(len(logits))) else logits[want]  # (plain decode: every row)
            if any(s.matcher is not None for s, _ in picks):  # masked in place below: a copy, in fp32
                chosen = chosen.to(torch.float32, copy=chosen is logits)
            for row, (s, _) in zip(chosen, picks):
                if s.matcher is not None:  # constrained decoding (such sequences never draft)
                    s.matcher.mask(row)
            out = sample(chosen, [s.params for s, _ in picks],
                         [s.prompt_ids for s, _ in picks], [s.output_ids + s.draft[:i] for s, i in picks],
                         [s.generator for s, _ in picks], self.tokenizer.eos_id)
            at = 0
            for s in batch:
                k = 1 + len(s.draft)
                new[s.seq_id] = accept_greedy(s.draft, out.token_ids[at:at + k], out.logprobs[at:at + k])
                at += k
        for s in ends:
            if s.draft and not s.params.greedy:
                new[s.seq_id] = verify(logits[rows[s.seq_id]], s, self.tokenizer.eos_id)
            if s.draft:
                self.drafted += len(s.draft)
                self.accepted += len(new[s.seq_id][0]) - 1
        return new

    @torch.inference_mode()
    def _draft(self, pairs, valid, hidden) -> None:
        """MTP over every main row whose next token is now known (its own latent cache stays complete), and a
        draft for each sequence that will decode next step."""
        spans, offsets, start = [], [], 0  # (seq, first position, rows) and their rows in the main batch
        for seq, n in pairs:
            m = valid[seq.seq_id]
            if not seq.finished:
                spans.append((seq, seq.num_computed - m, m))
                offsets += range(start, start + m)
            start += n
        if not spans:
            return
        drafting, last, end = [], [], 0  # decoding next step: every known token but the newest is cached
        for seq, _, m in spans:
            end += m
            if (not seq.in_prefill and seq.num_computed + 1 == len(seq.all_ids)
                    and len(seq.all_ids) + 1 < self.max_len and seq.matcher is None):
                drafting.append(seq)
                last.append(end - 1)
        # Row i pairs h_i with t_{i+1}: the token one place later.
        if self._absorbed([m for _, _, m in spans]):  # a decode step: CUDA graph on a GPU
            logits = self._decode_mtp(*self._rows(spans, shift=1), hidden[offsets])[0][to_device(last, self.device)]
        else:
            ids, pos, slots, tables = self._flat(spans, shift=1)
            cache = PagedKV(self.kv, slots, tables, [s.num_computed for s, _, _ in spans], [m for _, _, m in spans],
                            to_device(last, self.device))
            with self._fused():
                logits = self.model.draft(ids, hidden[offsets], pos, cache).float()
        for seq, d, q in zip(drafting, *propose(logits, drafting, self.tokenizer.eos_id)):
            seq.draft, seq.draft_q = [d], q

    def _append(self, seq: Sequence, tok: int, lp: TokenLogprobs | None) -> None:
        """Record a sampled token, stream its text, and decide whether the sequence is done."""
        p = seq.params
        if seq.matcher is not None:
            seq.matcher.accept(tok)
        seq.output_ids.append(tok)
        seq.all_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        reason, stop = None, None
        if tok in p.stop_token_ids:
            reason, stop = "stop", tok
        elif tok == self.tokenizer.eos_id and not p.ignore_eos:
            reason = "stop"
        if reason is None:
            seq.detok.add([tok])
            if seq.detok.stopped:
                reason, stop = "stop", seq.detok.stop_reason
            elif (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or len(seq.all_ids) >= self.max_len:
                reason = "length"
        if reason is not None:
            seq.detok.flush()
            seq.stop_reason = stop
            self.scheduler.finish(seq, reason)

    def _outputs(self, request_ids, appended: dict[int, list[int]]) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            seqs = self.requests.get(rid)
            if seqs is None:  # aborted
                continue
            comps = []
            for s in seqs:
                text = s.detok.text
                comps.append(CompletionOutput(
                    s.index, text, list(s.output_ids), text[s.emitted:], appended.get(s.seq_id, []),
                    s.finish_reason, s.stop_reason, s.logprobs if s.params.logprobs is not None else None))
                s.emitted = len(text)
            done = all(s.finished for s in seqs)
            outs.append(RequestOutput(rid, seqs[0].prompt_ids, comps, seqs[0].num_cached, done))
            if done:
                del self.requests[rid]
        return outs


class _Ahead:
    """A launched decode step: its sequences and their sampled tokens (on the device), copied to host memory as
    soon as the GPU has them."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor):
        self.seqs, self.tokens = seqs, tokens
        self.index = {s: i for i, s in enumerate(seqs)}
        self.host, self.done = tokens, None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def host_list(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()  # this step only, not the one launched after it
        return self.host.tolist()


def _fingerprint(model: Transformer) -> str:
    h = hashlib.blake2b(json.dumps(model.config.to_hf_dict(), sort_keys=True).encode(), digest_size=16)
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().flatten()[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()
