"""Problems with verifiable answers for SFT, GRPO and `dsv3 eval` (docs/post-training.md#tasks), all generated
offline.

A completion answers in the R1 format: `<think>reasoning</think>answer`. Each task generates seeded problems,
scores an answer, and writes a worked solution in that format (the SFT warm-start data, so a small model learns
the format before RL: without it GRPO gets no reward signal).

- `arithmetic`: n-digit addition and subtraction, solved column by column in the reasoning.
- `chain`: sums of several small numbers, rewritten one addition per line (the GRPO demo's task).
- `countdown`: reach a target with + − × ÷ using each given number once (TinyZero's task).
- `rg:NAME`: any reasoning-gym dataset (optional dependency), scored by reasoning-gym itself.

Held-out problems never appear in training: a problem belongs to the test split iff a hash of its question
falls in the first `TEST_SHARE` of the hash space, whatever seed generated it.
"""
from __future__ import annotations

import ast
import hashlib
import operator
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dsv3.options import option
from dsv3.tokenizer import THINK, THINK_END

TEST_SHARE = 0.1


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the reference answer, as text
    data: dict = field(default_factory=dict, compare=False)  # what the scorer needs beyond the answer

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def split_of(question: str) -> str:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    return "test" if h < TEST_SHARE else "train"


def final_answer(completion: str) -> str | None:
    """The text after the reasoning block, or None when the completion is not `<think>…</think>answer`."""
    if THINK_END not in completion:
        return None
    answer = completion.rsplit(THINK_END, 1)[1].strip()
    return answer or None


def well_formed(completion: str) -> bool:
    """R1's format rule: one reasoning block first, then a non-empty answer."""
    text = completion.strip()
    return (text.startswith(THINK) and text.count(THINK) == 1 and text.count(THINK_END) == 1
            and final_answer(text) is not None)


class Task:
    name: str

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def score(self, answer: str, problem: Problem) -> float:
        """1.0 for a correct final answer (already extracted), else 0.0."""
        return float(answer.strip() == problem.answer)

    def reasoning(self, problem: Problem) -> str:
        raise NotImplementedError

    def solution(self, problem: Problem, reasoning: bool = True) -> str:
        """The worked solution, or (reasoning=False) the answer straight after an empty reasoning block."""
        thought = f"{self.reasoning(problem)}\n" if reasoning else ""
        return f"{THINK}\n{thought}{THINK_END}\n{problem.answer}"

    def problems(self, n: int, seed: int, split: str = "train", fewer_ok: bool = False) -> list[Problem]:
        """n distinct problems of the split, reproducible from the seed (fewer_ok: all there are, if fewer)."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        rng, seen, out = random.Random(f"{self.name}/{seed}/{split}"), set(), []
        for _ in range(200 * n + 1000):
            if len(out) == n:
                return out
            p = self.sample(rng)
            if p.question not in seen and split_of(p.question) == split:
                seen.add(p.question)
                out.append(p)
        if fewer_ok and out:
            return out
        raise ValueError(f"task {self.name!r} has fewer than {n} distinct {split} problems")


class Arithmetic(Task):
    """a + b or a − b (a ≥ b) with `min_digits`..`max_digits`-digit operands; the reasoning adds or subtracts
    column by column from the right, carrying or borrowing, and grows the result one digit per line."""

    def __init__(self, min_digits: int = 2, max_digits: int = 3, ops: str = "+-"):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"digits {min_digits}..{max_digits}: need 1 <= min_digits <= max_digits")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"ops={ops!r}: use '+', '-' or both")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops
        self.name = f"arithmetic{min_digits}-{max_digits}{ops}"

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    def sample(self, rng: random.Random) -> Problem:
        a, b, op = self._number(rng), self._number(rng), rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        return Problem(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b), {"a": a, "b": b, "op": op})

    def reasoning(self, problem: Problem) -> str:
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        width = max(len(str(a)), len(str(b)))
        da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
        lines, carry, digits = [], 0, ""
        for x, y in zip(map(int, da), map(int, db)):
            if op == "+":
                s = x + y + carry
                step, digit, carry = f"{x}+{y}+{carry}={s}", s % 10, s // 10
                flag = f"carry {carry}"
            else:
                s = x - y - carry
                step, digit, carry = f"{x}-{y}-{carry}={s}", s % 10, int(s < 0)
                flag = f"borrow {carry}"
            digits = str(digit) + digits
            lines.append(f"{step}, {flag}, so far {digits}")
        if op == "+" and carry:
            digits = "1" + digits
            lines.append(f"carry 1, so far {digits}")
        return "\n".join(lines)


class ChainSum(Task):
    """a + b + c ... of `min_terms`..`max_terms` numbers of up to `digits` digits. The reasoning rewrites the
    sum once per line, the first two terms replaced by their sum, so each step reads its operands from the start
    of the line before and copies the rest (a small model cannot count which term of the question comes next)."""

    def __init__(self, min_terms: int = 3, max_terms: int = 5, digits: int = 1):
        if not 2 <= min_terms <= max_terms or digits < 1:
            raise ValueError(f"terms {min_terms}..{max_terms}, digits {digits}: need 2 <= min <= max, digits >= 1")
        self.min_terms, self.max_terms, self.digits = min_terms, max_terms, digits
        self.name = f"chain{min_terms}-{max_terms}x{digits}"

    def sample(self, rng: random.Random) -> Problem:
        terms = [rng.randint(1, 10**self.digits - 1) for _ in range(rng.randint(self.min_terms, self.max_terms))]
        return Problem(f"What is {' + '.join(map(str, terms))}?", str(sum(terms)), {"terms": terms})

    def reasoning(self, problem: Problem) -> str:
        terms, lines = list(problem.data["terms"]), []
        while len(terms) > 1:
            lines.append(" + ".join(map(str, terms)))
            terms = [terms[0] + terms[1], *terms[2:]]
        return "\n".join(lines + [str(terms[0])])


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _OPS[type(node.op)](left, right)  # ZeroDivisionError is caught by the caller
    raise ValueError("only integers, + - * / and parentheses are allowed")


class Countdown(Task):
    """Reach the target with + − × ÷ and parentheses, using each of the given numbers exactly once."""

    name = "countdown"

    def __init__(self, count: int = 3, largest: int = 25):
        if count < 2:
            raise ValueError(f"count={count}: countdown needs at least 2 numbers")
        self.count, self.largest = count, largest

    def sample(self, rng: random.Random) -> Problem:
        while True:  # a random expression over the numbers whose value is a positive integer
            nums = [rng.randint(1, self.largest) for _ in range(self.count)]
            expr, steps = str(nums[0]), []
            value = Fraction(nums[0])
            for x in nums[1:]:
                op = rng.choice("+-*/")
                new = _OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}[op]](value, Fraction(x))
                if new.denominator != 1 or new <= 0:
                    break
                steps.append(f"{value}{op}{x}={new}")
                expr, value = f"({expr}){op}{x}" if op in "*/" and any(c in expr for c in "+-") else \
                    f"{expr}{op}{x}", new
            else:
                shown = sorted(nums)
                return Problem(f"Using the numbers {shown}, each exactly once, with + - * / and parentheses, "
                               f"make {value}.", expr, {"numbers": shown, "target": int(value), "steps": steps})

    def score(self, answer: str, problem: Problem) -> float:
        used: list[int] = []
        try:
            value = _evaluate(ast.parse(answer.strip(), mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            return 0.0
        return float(sorted(used) == problem.data["numbers"] and value == problem.data["target"])

    def reasoning(self, problem: Problem) -> str:
        return "\n".join(problem.data["steps"])


class ReasoningGym(Task):
    """A reasoning-gym dataset (pip install reasoning-gym), scored by its own scorer. Its warm-start solutions
    carry no worked reasoning, only the answer format."""

    def __init__(self, dataset: str):
        try:
            import reasoning_gym
        except ImportError:
            raise ValueError(f"task 'rg:{dataset}' needs reasoning-gym: pip install reasoning-gym") from None
        self.dataset, self.name, self._rg = dataset, f"rg:{dataset}", reasoning_gym
        self._score = reasoning_gym.get_score_answer_fn(dataset)

    def problems(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        share = TEST_SHARE if split == "test" else 1 - TEST_SHARE
        size, out = int(1.5 * n / share) + 64, []
        for entry in self._rg.create_dataset(self.dataset, size=size, seed=seed):
            if split_of(entry["question"]) == split and len(out) < n:
                out.append(Problem(entry["question"], str(entry["answer"]), {"entry": entry}))
        if len(out) < n:
            raise ValueError(f"{self.name}: only {len(out)} {split} problems in {size} generated; ask for fewer")
        return out

    def score(self, answer: str, problem: Problem) -> float:
        return float(self._score(answer, problem.data["entry"]) or 0.0)

    def reasoning(self, problem: Problem) -> str:
        return f"The answer is {problem.answer}."


# The names get_task accepts; the --task help of grpo, rft and eval lists them from here.
TASKS = ("arithmetic[:MIN-MAX[+-]]", "chain[:MIN-MAX]", "countdown[:COUNT]", "rg:DATASET")


def task_option(default: str | None) -> Any:
    return option(default, unset="none", help=f"{', '.join(TASKS)} (rg: a reasoning-gym dataset)")


def get_task(name: str) -> Task:
    """`arithmetic` (2–3 digits, + and −), `arithmetic:MIN-MAX[+-]` (digits), `chain[:MIN-MAX]` (terms),
    `countdown[:COUNT]`, `rg:DATASET`."""
    kind, _, arg = name.partition(":")
    if kind == "arithmetic":
        if not arg:
            return Arithmetic()
        digits, ops = arg.rstrip("+-"), arg[len(arg.rstrip("+-")):] or "+-"
        lo, _, hi = digits.partition("-")
        try:
            return Arithmetic(int(lo), int(hi or lo), ops)
        except ValueError as e:
            raise ValueError(f"task {name!r}: expected arithmetic:MIN-MAX with optional ops, e.g. "
                             f"arithmetic:2-3+ ({e})") from None
    if kind == "chain":
        lo, _, hi = (arg or "3-5").partition("-")
        return ChainSum(int(lo), int(hi or lo))
    if kind == "countdown":
        return Countdown(int(arg)) if arg else Countdown()
    if kind == "rg" and arg:
        return ReasoningGym(arg)
    raise ValueError(f"unknown task {name!r}: use {', '.join(TASKS)}")
