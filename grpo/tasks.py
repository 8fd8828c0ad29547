"""Built-in synthetic tasks: problems generated from a seed, no download.

A task yields rows `{"question": str, "answer": str}` (plus task-specific fields); the prompt
template turns a row into the text the policy sees (see `grpo.data`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticTask:
    """`a op b` with a in `[0, max_first]` and b in `[0, max_second]` (default: two-digit plus
    one-digit, 1,000 distinct problems)."""

    max_first: int = 99
    max_second: int = 9
    ops: tuple[str, ...] = ("+",)

    def sample_problem(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, self.max_first), rng.randint(0, self.max_second)
        op = rng.choice(self.ops)
        return f"{a}{op}{b}", str(a + b if op == "+" else a - b)

    def all_rows(self) -> list[dict]:
        rows = []
        for op in self.ops:
            for a in range(self.max_first + 1):
                for b in range(self.max_second + 1):
                    rows.append({"question": f"{a}{op}{b}", "answer": str(a + b if op == "+" else a - b)})
        return rows

    def split(self, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Disjoint (train, held-out) rows; the held-out set never appears among RL prompts."""
        rows = self.all_rows()
        if num_eval >= len(rows):
            raise ValueError(f"num_eval={num_eval} leaves no training problems (only {len(rows)})")
        random.Random(seed).shuffle(rows)
        return rows[num_eval:], rows[:num_eval]
