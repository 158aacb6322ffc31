"""Sampling: per-request SamplingParams, logit processing, and one RNG stream per row.

Pipeline (one row per sequence, all rows batched): raw logits → repetition / frequency / presence penalties and
logit_bias → min_tokens masking → (non-greedy rows) temperature → top-k → top-p → min-p → draw. `process_logits`
returns the processed fp32 logits, and `sample` draws from exactly softmax(process_logits(...)), so the
speculative-decoding rejection sampler can call `process_logits` for the target and draft distributions and stay
consistent.

Each non-greedy row draws from its own `torch.Generator` with exactly one RNG call: one uniform u per row, and
the token is where u·total falls in the row's cumulative weights (inverse CDF, two-level: 64-token blocks, then
within the chosen block, in fp64). A seeded request's tokens therefore do not depend on which other rows share
the batch, their order, or how many there are. Rows with no generator draw from the global RNG. (An exponential race,
argmax p / E, needs a random number per vocabulary entry: on a CPU the RNG alone cost more than the model's
head.)

Logprobs are log_softmax of the RAW model logits (before penalties, temperature and filters), vLLM's default
(`logprobs_mode="raw_logprobs"`): they describe the model, not the sampler's reshaped distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers / vLLM: divides positive logits, multiplies negative ones
    frequency_penalty: float = 0.0  # OpenAI: per occurrence in the output
    presence_penalty: float = 0.0  # OpenAI: once if present in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI: token id -> added to its logit, in [-100, 100]
    max_tokens: int | None = 16  # None => until the context is full
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None => none; k => the sampled token's logprob plus the top-k alternatives
    skip_special_tokens: bool = True
    grammar: object = None  # a structured.Grammar: every token is masked to what it allows (JSON, tool calls)

    def __post_init__(self):
        if isinstance(self.stop, str):  # OpenAI accepts `stop: "###"` as well as a list
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        # Written as `not (ok)` so NaN fails every check.
        checks = [
            ("n", self.n, self.n >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k, self.top_k >= -1, ">= -1 (0 or -1 = off)"),
            ("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0"),
            ("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or self.max_tokens >= 1, "None or >= 1"),
            ("min_tokens", self.min_tokens, self.min_tokens >= 0, ">= 0"),
            ("logit_bias", self.logit_bias, all(-100 <= b <= 100 for b in self.logit_bias.values()),
             "token id -> bias in [-100, 100]"),
            ("logprobs", self.logprobs, self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"None or in [0, {MAX_LOGPROBS}]"),
        ]
        for name, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} must be {rule}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must hold non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """The raw logits are changed before any filter: penalties, or a logit_bias."""
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or bool(self.logit_bias))


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), logprob descending; len == params.logprobs


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows whose params.logprobs is None


def _row_param(params: list[SamplingParams], rows: list[int], name: str, device) -> Tensor:
    return torch.tensor([getattr(params[i], name) for i in rows], dtype=torch.float32, device=device)[:, None]


def _token_counts(ids: list[list[int]], V: int, device) -> Tensor:
    # (P, V) fp32 occurrence counts from one flat index_add over row*V + id: one host→device copy for all rows,
    # no int64 (P, V) temporary, and exact (integer sums in fp32) whatever order the atomic adds land in.
    flat = torch.tensor([r * V + t for r, row in enumerate(ids) for t in row], dtype=torch.long, device=device)
    counts = torch.zeros(len(ids) * V, dtype=torch.float32, device=device)
    return counts.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device)).view(len(ids), V)


def apply_penalties(logits_RV: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                    output_ids: list[list[int]]) -> Tensor:
    """fp32 logits with the penalties and logit biases applied (a new tensor; the input itself, as fp32, when no row
    has any)."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]  # rows without penalties cost nothing
    if not rows:
        return logits_RV.float()
    logits_RV = logits_RV.to(torch.float32, copy=True)
    V, dev = logits_RV.shape[-1], logits_RV.device
    x_PV = logits_RV[rows]
    out_counts_PV = _token_counts([output_ids[i] for i in rows], V, dev)
    # Repetition penalty looks at prompt AND output (transformers / vLLM); OpenAI penalties at the output only.
    seen_PV = (out_counts_PV > 0) | (_token_counts([prompt_ids[i] for i in rows], V, dev) > 0)
    rep_P1 = _row_param(params, rows, "repetition_penalty", dev)
    x_PV = torch.where(seen_PV, torch.where(x_PV > 0, x_PV / rep_P1, x_PV * rep_P1), x_PV)
    x_PV = x_PV - _row_param(params, rows, "frequency_penalty", dev) * out_counts_PV
    x_PV = x_PV - _row_param(params, rows, "presence_penalty", dev) * (out_counts_PV > 0).float()
    bias = [(r, t, b) for r, i in enumerate(rows) for t, b in params[i].logit_bias.items()]
    if bias:  # OpenAI adds the bias to the logit the penalties left, before temperature and the filters
        r, t, b = zip(*bias)
        x_PV = x_PV.index_put((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                              torch.tensor(b, dtype=torch.float32, device=dev), accumulate=True)
    logits_RV[rows] = x_PV
    return logits_RV


def _mask_min_tokens(logits_RV: Tensor, params: list[SamplingParams], output_ids: list[list[int]],
                     eos_id: int | None) -> Tensor:
    # Until min_tokens were generated, nothing that would end the sequence may be drawn. With ignore_eos the EOS
    # id is an ordinary token (it ends nothing), so it stays drawable, as in vLLM's all_stop_token_ids.
    pairs = []
    for i, p in enumerate(params):
        if len(output_ids[i]) < p.min_tokens:
            stops = p.stop_token_ids + ([eos_id] if eos_id is not None and not p.ignore_eos else [])
            pairs += [(i, t) for t in stops]
    if not pairs:
        return logits_RV
    r, t = torch.tensor(pairs, dtype=torch.long, device=logits_RV.device).unbind(1)
    return logits_RV.index_put((r, t), torch.tensor(float("-inf"), device=logits_RV.device))


def _filter(x_RV: Tensor, params: list[SamplingParams], rows: list[int]) -> Tensor:
    # Temperature → top-k → top-p → min-p, each on the distribution the previous step left (transformers order).
    dev, V = x_RV.device, x_RV.shape[-1]
    x_RV = x_RV / _row_param(params, rows, "temperature", dev)
    k = [params[i].top_k if 0 < params[i].top_k < V else V for i in rows]
    top_p = [params[i].top_p for i in rows]
    if any(kk < V for kk in k) or any(pp < 1 for pp in top_p):
        # One descending sort serves both: top-k and top-p are prefixes of the sorted order.
        sorted_RV, idx_RV = x_RV.sort(dim=-1, descending=True)
        k_R1 = torch.tensor(k, dtype=torch.long, device=dev)[:, None]
        kth_R1 = sorted_RV.gather(1, k_R1 - 1)
        sorted_RV = sorted_RV.masked_fill(sorted_RV < kth_R1, float("-inf"))  # ties with the k-th are kept
        # Nucleus: keep token j iff the mass strictly before it is < top_p, i.e. the smallest prefix whose mass
        # reaches top_p; the top token (mass 0 before it) is always kept. Rows at top_p == 1 skip it, so fp32
        # cumsum rounding can never cut their tail.
        probs_RV = sorted_RV.softmax(dim=-1)
        before_RV = probs_RV.cumsum(dim=-1) - probs_RV
        top_p_R1 = torch.tensor(top_p, dtype=torch.float32, device=dev)[:, None]
        sorted_RV = sorted_RV.masked_fill((before_RV >= top_p_R1) & (top_p_R1 < 1), float("-inf"))
        x_RV = torch.empty_like(x_RV).scatter_(1, idx_RV, sorted_RV)
    if any(params[i].min_p > 0 for i in rows):
        probs_RV = x_RV.softmax(dim=-1)
        floor_R1 = _row_param(params, rows, "min_p", dev) * probs_RV.amax(dim=-1, keepdim=True)
        x_RV = x_RV.masked_fill(probs_RV < floor_R1, float("-inf"))
    return x_RV


def process_logits(logits_RV: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                   output_ids: list[list[int]], eos_id: int | None) -> Tensor:
    """fp32 logits whose softmax is the distribution `sample` draws from (greedy rows: argmax of them). The input
    is never modified (the result may be the input itself when nothing applies)."""
    x_RV = _mask_min_tokens(apply_penalties(logits_RV, params, prompt_ids, output_ids), params, output_ids, eos_id)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):
        return _filter(x_RV, params, rows)
    if rows:  # filters cannot change a greedy row's argmax, so greedy rows skip them
        x_RV = x_RV.clone() if x_RV is logits_RV else x_RV
        x_RV[rows] = _filter(x_RV[rows], params, rows)
    return x_RV


_BLOCK = 64  # tokens per block of the two-level inverse CDF


def _uniforms(generators: list[torch.Generator | None], device) -> Tensor:
    """(R,) fp64 U[0, 1): one draw per row from its own generator (the global one for rows without)."""
    return torch.stack([torch.rand((), dtype=torch.float64, generator=g, device=g.device if g else device).to(device)
                        for g in generators])


def draw_rows(w_RV: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """(R,) one draw per row from the non-negative weights `w_RV` (unnormalized; zero weight is never drawn), one
    uniform per row: the first token whose cumulative weight exceeds u·total. Block sums (fp32, 64 tokens each) are
    accumulated in fp64 to pick the block, then the block's own fp64 cumsum picks the token."""
    R, V = w_RV.shape
    nb = -(-V // _BLOCK)
    w_RV = torch.nn.functional.pad(w_RV, (0, nb * _BLOCK - V)) if nb * _BLOCK != V else w_RV
    w_RNB = w_RV.view(R, nb, _BLOCK)
    outer_RN = w_RNB.sum(-1).double().cumsum_(-1)
    t_R1 = (_uniforms(generators, w_RV.device) * outer_RN[:, -1])[:, None]  # < total: u <= 1 - 2^-53
    # The clamps keep rounding from ever landing past the last block / token of positive weight.
    blk_R1 = torch.searchsorted(outer_RN, t_R1, right=True).minimum((outer_RN < outer_RN[:, -1:]).sum(-1, True))
    before_R1 = torch.where(blk_R1 > 0, outer_RN.gather(1, (blk_R1 - 1).clamp_(min=0)), 0.0)
    inner_RB = w_RNB.gather(1, blk_R1[:, :, None].expand(R, 1, _BLOCK))[:, 0].double().cumsum_(-1)
    last_R1 = (inner_RB < inner_RB[:, -1:]).sum(-1, True)
    j_R1 = torch.searchsorted(inner_RB, t_R1 - before_R1, right=True).minimum(last_R1)
    return (blk_R1 * _BLOCK + j_R1)[:, 0]


def sample(logits_RV: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
           output_ids: list[list[int]], generators: list[torch.Generator | None],
           eos_id: int | None) -> SampleOutput:
    token_ids = host_list(choose(logits_RV, params, prompt_ids, output_ids, generators, eos_id))
    return SampleOutput(token_ids, token_logprobs(logits_RV, token_ids, [p.logprobs for p in params]))


def choose(logits_RV: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
           output_ids: list[list[int]], generators: list[torch.Generator | None], eos_id: int | None) -> Tensor:
    """(R,) the sampled token ids, on the logits' device (no host sync)."""
    R, V = logits_RV.shape
    if not len(params) == len(prompt_ids) == len(output_ids) == len(generators) == R:
        raise ValueError(f"logits rows={R} must equal len(params)={len(params)}, len(prompt_ids)="
                         f"{len(prompt_ids)}, len(output_ids)={len(output_ids)}, len(generators)={len(generators)}")
    rows = [i for i, p in enumerate(params) if not p.greedy]
    # Temperature alone (the common case) is folded into the draw's exponent: the raw logits, in the model's dtype,
    # are read once instead of copied to fp32 and divided first (each a pass over R x V floats).
    plain = not any(p.has_penalties or len(out) < p.min_tokens
                    or (not p.greedy and (p.top_p < 1 or 0 < p.top_k < V or p.min_p > 0))
                    for p, out in zip(params, output_ids))
    x_RV = logits_RV if plain else process_logits(logits_RV, params, prompt_ids, output_ids, eos_id)
    # max(dim).indices is argmax (the first maximum) at a third of argmax's cost on a CPU.
    token_R = x_RV.max(dim=-1).indices if len(rows) < R else torch.empty(R, dtype=torch.long, device=x_RV.device)
    if rows:
        x_SV = x_RV if len(rows) == R else x_RV[rows]
        w_SV = x_SV - x_SV.amax(dim=-1, keepdim=True).float()  # (S, V) fp32; filtered tokens (-inf) weigh 0
        if plain:
            w_SV.mul_(1 / _row_param(params, rows, "temperature", w_SV.device))
        token_R[rows] = draw_rows(w_SV.exp_(), [generators[i] for i in rows])
    return token_R


def host_list(t: Tensor) -> list:
    """`t.tolist()`, waiting for the GPU with the GIL released first (`tolist` would hold it for the whole wait,
    and the server's event loop, on another thread, could not run meanwhile)."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t.tolist()


def draw(probs_V: Tensor, generator: torch.Generator | None) -> int:
    """One draw from `probs_V` (need not be normalized), the way `sample` draws: one RNG call."""
    return int(draw_rows(probs_V[None], [generator])[0])


def token_logprobs(raw_RV: Tensor, token_ids: list[int], ks: list[int | None]) -> list[TokenLogprobs | None]:
    """Per row that asks (k not None): the chosen token's log-prob and the top-k alternatives, from log_softmax of
    the RAW logits (see the module docstring)."""
    out: list[TokenLogprobs | None] = [None] * len(ks)
    rows = [i for i, k in enumerate(ks) if k is not None]
    if not rows:
        return out
    lp_RV = torch.log_softmax(raw_RV[rows].float(), dim=-1)
    chosen_R = lp_RV.gather(1, torch.tensor([token_ids[i] for i in rows], device=lp_RV.device)[:, None])[:, 0]
    top_lp_RK, top_id_RK = lp_RV.topk(min(max(ks[i] for i in rows), lp_RV.shape[-1]), dim=-1)
    chosen, top_lp, top_id = chosen_R.tolist(), top_lp_RK.tolist(), top_id_RK.tolist()
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprobs(token_ids[i], chosen[j], list(zip(top_id[j][:k], top_lp[j][:k])))
    return out
