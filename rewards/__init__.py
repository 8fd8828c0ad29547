"""Reward functions and the scorer the training loop calls (first cut; hardened separately)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction


class UnknownRewardError(ValueError):
    pass


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


_ANSWER = re.compile(r"<answer>(.{0,200}?)</answer>", re.S)


def math_answer(completion: str, example: dict, **context) -> float:
    """1.0 when the last <answer> equals the gold number.

    >>> math_answer("<think>1+1=2</think><answer>2</answer>", {"answer": "2"})
    1.0
    """
    found = _ANSWER.findall(completion[-4000:])
    if not found:
        return 0.0
    try:
        return float(Fraction(found[-1].strip()) == Fraction(str(example["answer"]).strip()))
    except (ValueError, ZeroDivisionError):
        return 0.0


def format_reward(completion: str, example: dict, **context) -> float:
    """1.0 for exactly <think>..</think><answer>..</answer> (whitespace around allowed).

    >>> format_reward("<think>a</think><answer>b</answer>", {})
    1.0
    """
    text = completion.strip()
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    inner = text[len("<think>") : -len("</answer>")]
    head, sep, tail = inner.partition("</think>")
    if not sep or "<think>" in head or "</think>" in tail:
        return 0.0
    tail = tail.strip()
    if not tail.startswith("<answer>") or "<answer>" in tail[8:] or "</answer>" in tail:
        return 0.0
    return 1.0


BUILTIN = {"math_answer": math_answer, "format": format_reward}


def known_reward_names() -> list[str]:
    return sorted(BUILTIN)


@dataclass
class ScoreResult:
    total: list[float]
    per_function: dict[str, list[float | None]]
    metrics: dict[str, float]


class Scorer:
    def __init__(self, specs, workers=0, timeout_s=2.0, memory_mb=1024, timeout_score=0.0,
                 error_score=0.0, fail_fast=False):
        self.specs = list(specs)
        self.fns = {}
        for spec in self.specs:
            if spec.name not in BUILTIN:
                raise UnknownRewardError(f"unknown reward {spec.name!r}; known: {known_reward_names()}")
            self.fns[spec.name] = BUILTIN[spec.name]

    def score(self, completions, examples, contexts=None):
        per = {s.name: [self.fns[s.name](c, e) for c, e in zip(completions, examples)] for s in self.specs}
        total = [sum(s.weight * per[s.name][i] for s in self.specs) for i in range(len(completions))]
        metrics = {f"reward/{n}": sum(v) / max(1, len(v)) for n, v in per.items()}
        return ScoreResult(total, per, metrics)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
