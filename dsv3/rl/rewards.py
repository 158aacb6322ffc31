"""Rule-based rewards (R1 style) and how they combine.

A reward function takes the batch and returns one score per completion:
    fn(completions: list[str], problems: list[Problem], lengths: list[int]) -> list[float | None]
Built in: `accuracy` (the task's verifier on the final answer), `format` (`<think>…</think>` then an answer),
`overlong` (DAPO's soft overlong punishment: 0 up to max_tokens − buffer, then linearly down to −1 at
max_tokens). Any importable `package.module:function` plugs in the same way. `--rewards accuracy=1,format=1`
weighs them; the total is the weighted sum.

None means "does not apply to this sample" (TRL's convention): that function is left out of the sample's sum.
A function that raises, returns the wrong number of scores or a non-finite score, or a sample that no function
scores, stops the run with an error naming the function and the sample: training never goes on with garbage.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from dsv3.rl.tasks import Problem, Task, final_answer, well_formed

RewardFn = Callable[..., list]


class RewardError(ValueError):
    pass


def accuracy(task: Task) -> RewardFn:
    def score(completions, problems, lengths):
        out = []
        for c, p in zip(completions, problems):
            answer = final_answer(c)
            out.append(0.0 if answer is None else task.score(answer, p))
        return out
    return score


def format_reward(completions, problems, lengths):
    return [float(well_formed(c)) for c in completions]


def overlong(max_tokens: int, buffer: int) -> RewardFn:
    def score(completions, problems, lengths):
        start = max_tokens - buffer
        return [0.0 if n <= start else max(-1.0, (start - n) / buffer) for n in lengths]
    return score


@dataclass
class RewardSet:
    functions: dict[str, tuple[RewardFn, float]]  # name -> (function, weight)

    def __call__(self, completions: list[str], problems: list[Problem],
                 lengths: list[int]) -> tuple[list[float], dict[str, list[float | None]]]:
        """-> (total reward per completion, each function's raw scores)."""
        per_fn, totals = {}, [0.0] * len(completions)
        scored = [False] * len(completions)
        for name, (fn, weight) in self.functions.items():
            try:
                values = list(fn(completions, problems, lengths))
            except Exception as e:
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            if len(values) != len(completions):
                raise RewardError(f"reward function {name!r} returned {len(values)} scores for "
                                  f"{len(completions)} completions")
            for i, v in enumerate(values):
                if v is None:
                    continue
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise RewardError(f"reward function {name!r} gave {v!r} for sample {i} "
                                      f"(completion {completions[i][:80]!r}): need a finite number or None")
                totals[i] += weight * float(v)
                scored[i] = True
            per_fn[name] = values
        if not all(scored):
            i = scored.index(False)
            raise RewardError(f"no reward function scored sample {i} (completion {completions[i][:80]!r}): every "
                              "function returned None")
        return totals, per_fn


def build_rewards(spec: str, task: Task, max_tokens: int, overlong_buffer: int) -> RewardSet:
    """'accuracy=1,format=0.5,my.module:fn=1' -> RewardSet (weight 1 when omitted)."""
    functions = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition("=")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward {item!r}: weight {weight!r} is not a number") from None
        if name == "accuracy":
            fn = accuracy(task)
        elif name == "format":
            fn = format_reward
        elif name == "overlong":
            if not 0 < overlong_buffer < max_tokens:
                raise ValueError(f"overlong reward: buffer {overlong_buffer} must be in (0, max_tokens={max_tokens})")
            fn = overlong(max_tokens, overlong_buffer)
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reward {name!r}: cannot import it ({e})") from None
        else:
            raise ValueError(f"unknown reward {name!r}: accuracy, format, overlong or package.module:function")
        functions[name] = (fn, w)
    if not functions:
        raise ValueError(f"rewards={spec!r}: name at least one reward function")
    return RewardSet(functions)
