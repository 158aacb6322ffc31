"""MTP speculative decoding (SPEC §8.2): the MTP module drafts the token after next, the main model verifies it
in the same forward that decodes the next one.

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

from dsv3.infer.sampler import TokenLogprobs, draw, process_logits, sample, token_logprobs


def propose(mtp_logits_V: torch.Tensor, seq, eos_id: int | None) -> tuple[int, torch.Tensor | None]:
    """A draft token from the MTP logits under the sequence's sampling rules, and q (None when greedy)."""
    x = process_logits(mtp_logits_V[None], [seq.params], [seq.prompt_ids], [seq.output_ids], eos_id)[0]
    if seq.params.greedy:
        return int(x.argmax()), None
    q = x.softmax(-1)
    return draw(q, seq.generator), q


def verify(logits_2V: torch.Tensor, seq, eos_id: int | None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Tokens to append (1 or 2) for a sequence whose one-token draft rows 0 (judges it) and 1 (after it) give."""
    p, d, g = seq.params, seq.draft[0], seq.generator
    outs = [seq.output_ids, seq.output_ids + [d]]
    if p.greedy:  # both rows at once: x = the main model's choice for d's place, y = the token after d
        res = sample(logits_2V, [p, p], [seq.prompt_ids] * 2, outs, [g, g], eos_id)
        x, y = res.token_ids
        return ([d, y], res.logprobs) if x == d else ([x], res.logprobs[:1])
    target = process_logits(logits_2V[:1], [p], [seq.prompt_ids], outs[:1], eos_id)[0].softmax(-1)
    q = seq.draft_q
    u = float(torch.rand((), generator=g, device=g.device if g is not None else "cpu"))
    if u * float(q[d]) <= float(target[d]):  # accepted with probability min(1, p(d) / q(d))
        res = sample(logits_2V[1:], [p], [seq.prompt_ids], outs[1:], [g], eos_id)
        return [d, res.token_ids[0]], token_logprobs(logits_2V[:1], [d], [p.logprobs]) + res.logprobs
    x = draw((target - q).clamp_(min=0), g)  # the residual: p where the draft under-proposed
    return [x], token_logprobs(logits_2V[:1], [x], [p.logprobs])

