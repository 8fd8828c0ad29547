"""Prompts: where they come from, how they are rendered, and the order they are drawn in.

A data row is a dict with at least `question` and `answer` (the gold answer, a string). The
prompt template turns a row into the text the policy continues.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from grpo.config import DataConfig
from grpo.tasks import ArithmeticTask

# R1-Zero's template (DeepSeek-R1 paper, table 1) asks for <think>..</think><answer>..</answer>
# after "Assistant:". `r1_zero_tiny` keeps its shape in one line a tiny model can read.
TEMPLATES = {
    "r1_zero_tiny": (
        "User: {question}=? Show work in <think></think> then answer in <answer></answer>.\n"
        "Assistant:"
    ),
}


def render_prompt(template: str, row: dict) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(question=row["question"])


def load_rows(cfg: DataConfig, num_eval: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out evaluation rows); the two never share a problem."""
    if cfg.source == "arithmetic":
        task = ArithmeticTask(cfg.arithmetic.max_first, cfg.arithmetic.max_second, tuple(cfg.arithmetic.ops))
        return task.split(num_eval, seed=cfg.seed)
    raise ValueError(f"unknown data source {cfg.source!r}")


@dataclass
class PromptSampler:
    """Draws rows without replacement, reshuffling (seeded) at every epoch.

    `position` and `epoch` are all the state there is, so a resumed run draws the same prompts.
    """

    rows: list[dict]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("no training prompts")
        self._order = self._shuffled(self.epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[dict]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.rows[self._order[self.position]])
            self.position += 1
        return batch
