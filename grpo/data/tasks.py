"""Built-in synthetic tasks: problems generated from a seed, no download.

A task yields rows `{"question": str, "answer": str}` (plus task fields: countdown adds `numbers`,
`target`); the prompt template turns a row into the text the policy sees (see `grpo.data.prompts`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def shuffled_split(rows: list[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the first `num_eval` rows of a seeded shuffle are held out."""
    if num_eval >= len(rows):
        raise ValueError(f"num_eval={num_eval} leaves no training problems (only {len(rows)})")
    random.Random(seed).shuffle(rows)
    return rows[num_eval:], rows[:num_eval]


@dataclass(frozen=True)
class ArithmeticTask:
    """`a op b` with a in `[0, max_first]` and b in `[0, max_second]` (default: two-digit plus
    one-digit, 1,000 distinct problems)."""

    max_first: int = 99
    max_second: int = 9
    ops: tuple[str, ...] = ("+",)

    @staticmethod
    def value(a: int, op: str, b: int) -> int:
        """The value of `a op b`.

        >>> ArithmeticTask.value(347, "*", 29)
        10063
        """
        return a + b if op == "+" else a - b if op == "-" else a * b

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, self.max_first), rng.randint(0, self.max_second)
        op = rng.choice(self.ops)
        return f"{a}{op}{b}", str(self.value(a, op, b))

    def all_rows(self) -> list[dict]:
        rows = []
        for op in self.ops:
            for a in range(self.max_first + 1):
                for b in range(self.max_second + 1):
                    rows.append({"question": f"{a}{op}{b}", "answer": str(self.value(a, op, b))})
        return rows

    def split(self, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Disjoint (train, held-out) rows; the held-out set never appears among RL prompts."""
        return shuffled_split(self.all_rows(), num_eval, seed)


@dataclass(frozen=True)
class SumsTask:
    """A sum of `terms` numbers, the first in `[min_first, max_first]`, the others in `[1, max_term]`
    (default: a two-digit number plus three one-digit ones, 65,610 distinct problems).

    A task where thinking pays for a tiny model: one addition of a one-digit number is easy, the
    whole sum at once is not. `chain` writes the work out as a rewrite of the remaining sum, one
    addition per step (``47+8+6+9=55+6+9=61+9=70``), so that every step reads only the part just
    written, not a term far back in the prompt.
    """

    terms: int = 4
    min_first: int = 10
    max_first: int = 99
    max_term: int = 9

    def __post_init__(self):
        if self.terms < 2 or not 0 <= self.min_first <= self.max_first or self.max_term < 1:
            raise ValueError(f"sums: need terms >= 2, 0 <= min_first <= max_first and max_term >= 1 (got {self})")

    def sample_terms(self, rng: random.Random) -> list[int]:
        return [rng.randint(self.min_first, self.max_first)] + [rng.randint(1, self.max_term) for _ in range(self.terms - 1)]

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        terms = self.sample_terms(rng)
        return "+".join(map(str, terms)), str(sum(terms))

    @staticmethod
    def chain(terms: list[int]) -> str:
        """The worked sum: each step adds the first two terms and copies the rest.

        >>> SumsTask.chain([47, 8, 6, 9])
        '47+8+6+9=55+6+9=61+9=70'
        """
        parts, rest = ["+".join(map(str, terms))], list(terms)
        while len(rest) > 1:
            rest = [rest[0] + rest[1], *rest[2:]]
            parts.append("+".join(map(str, rest)))
        return "=".join(parts)

    def all_rows(self) -> list[dict]:
        rows = [[a] for a in range(self.min_first, self.max_first + 1)]
        for _ in range(self.terms - 1):
            rows = [r + [b] for r in rows for b in range(1, self.max_term + 1)]
        return [{"question": "+".join(map(str, r)), "answer": str(sum(r))} for r in rows]

    def split(self, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Disjoint (train, held-out) rows; the held-out set never appears among RL prompts."""
        return shuffled_split(self.all_rows(), num_eval, seed)


@dataclass(frozen=True)
class CountdownTask:
    """TinyZero's Countdown: reach `target` from `numbers` with + - * /, each number used once.

    Every generated problem is solvable: the target is the value of a random expression over the
    numbers whose intermediate results are all positive whole numbers (division only when exact).
    Rows carry `numbers`, `target`, a plain-text `question` and one solution as `answer`.
    """

    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 99
    max_target: int = 100
    ops: tuple[str, ...] = ("+", "-", "*", "/")
    num_problems: int = 20_000

    def _combine(self, op: str, a: tuple[int, str], b: tuple[int, str]) -> tuple[int, str] | None:
        (x, ex), (y, ey) = a, b
        wrap = lambda e: f"({e})" if " " in e else e  # noqa: E731 - parenthesise compound operands
        if op == "+":
            return x + y, f"{ex} + {ey}"
        if op == "-":
            return (x - y, f"{ex} - {wrap(ey)}") if x > y else None
        if op == "*":
            return x * y, f"{wrap(ex)} * {wrap(ey)}"
        return (x // y, f"{wrap(ex)} / {wrap(ey)}") if y > 1 and x % y == 0 else None

    def sample_problem(self, rng: random.Random, attempts: int = 1000) -> dict:
        """One solvable problem; intermediate values stay within [1, max_target]."""
        for _ in range(attempts):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            items = [(n, str(n)) for n in numbers]
            while len(items) > 1:
                i, j = rng.sample(range(len(items)), 2)
                ops = list(self.ops)
                rng.shuffle(ops)
                combined = next((c for c in (self._combine(op, items[i], items[j]) for op in ops)
                                 if c is not None and 1 <= c[0] <= self.max_target), None)
                if combined is None:
                    break
                items = [it for k, it in enumerate(items) if k not in (i, j)] + [combined]
            if len(items) == 1:
                target, answer = items[0]
                shown = ", ".join(map(str, numbers))
                return {"question": f"Using the numbers {shown}, make {target}. Use {' '.join(self.ops)} and each number exactly once.",
                        "answer": answer, "numbers": numbers, "target": target}
        raise ValueError("could not generate a countdown problem; widen max_target or the operators")

    def all_rows(self, seed: int) -> list[dict]:
        """`num_problems` distinct problems (by numbers and target), generated from `seed`."""
        rng, seen, rows = random.Random(seed), set(), []
        for _ in range(self.num_problems * 20):
            row = self.sample_problem(rng)
            key = (tuple(sorted(row["numbers"])), row["target"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
                if len(rows) == self.num_problems:
                    break
        return rows

    def split(self, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Disjoint (train, held-out) rows; no held-out (numbers, target) pair is trained on."""
        rows = self.all_rows(seed)
        if num_eval >= len(rows):
            raise ValueError(f"num_eval={num_eval} leaves no training problems (only {len(rows)})")
        return rows[num_eval:], rows[:num_eval]


SYNTHETIC_TASKS = ("arithmetic", "sums", "countdown")
