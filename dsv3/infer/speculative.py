"""MTP speculative decoding (docs/architecture.md#mtp-at-inference): the MTP module drafts the token after next,
the main model verifies it in the same forward that decodes the next one.

A decoding sequence with a draft d feeds [t_n, d] to the main model: row 0's logits judge d, row 1's give the
token after d for free if d is accepted, so a step yields 1 or 2 tokens.
  - greedy: accept d iff it is the main model's argmax at row 0 — the output is token-identical to plain
    greedy decoding;
  - sampling (Leviathan et al. 2023, Chen et al. 2023): d was drawn from the draft distribution q (never
    greedily); accept it with probability min(1, p(d) / q(d)), else draw from norm(max(0, p − q)). Either way the
    token is distributed exactly as p, the main model's processed distribution (same penalties, temperature and
    filters as plain sampling).
"""
from __future__ import annotations

import torch

from dsv3.infer.sampler import TokenLogprobs, draw, host_list, process_logits, sample, token_logprobs


def propose(mtp_logits_RV: torch.Tensor, seqs, eos_id: int | None) -> tuple[list[int], list[torch.Tensor | None]]:
    """A draft token per sequence from its MTP logits row under its sampling rules, and the distribution q it was
    drawn from (None when greedy)."""
    x_RV = process_logits(mtp_logits_RV, [s.params for s in seqs], [s.prompt_ids for s in seqs],
                          [s.output_ids for s in seqs], eos_id)
    drafts, qs = host_list(x_RV.argmax(-1)), [None] * len(seqs)
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            qs[i] = x_RV[i].softmax(-1)
            drafts[i] = draw(qs[i], s.generator)
    return drafts, qs


def accept_greedy(draft: list[int], tokens: list[int], logprobs: list) -> tuple[list[int], list]:
    """Greedy verification, from the main model's choices at the draft's place and after it (`tokens`): the draft
    is kept iff it is that choice, so the output is token-identical to plain greedy decoding."""
    if draft and tokens[0] == draft[0]:
        return [draft[0], tokens[1]], logprobs
    return tokens[:1], logprobs[:1]


def verify(logits_2V: torch.Tensor, seq, eos_id: int | None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Tokens to append (1 or 2) for a sampling sequence whose one-token draft rows 0 (judges it) and 1 (after
    it) give: the rejection-sampling rule above."""
    p, d, g = seq.params, seq.draft[0], seq.generator
    outs = [seq.output_ids, seq.output_ids + [d]]
    target = process_logits(logits_2V[:1], [p], [seq.prompt_ids], outs[:1], eos_id)[0].softmax(-1)
    q = seq.draft_q
    u = float(torch.rand((), generator=g, device=g.device if g is not None else "cpu"))
    if u * float(q[d]) <= float(target[d]):  # accepted with probability min(1, p(d) / q(d))
        res = sample(logits_2V[1:], [p], [seq.prompt_ids], outs[1:], [g], eos_id)
        return [d, res.token_ids[0]], token_logprobs(logits_2V[:1], [d], [p.logprobs]) + res.logprobs
    x = draw((target - q).clamp_(min=0), g)  # the residual: p where the draft under-proposed
    return [x], token_logprobs(logits_2V[:1], [x], [p.logprobs])
