"""The combiner: runs every reward on every completion, applies weights, reports per function.

`Scorer` resolves every reward name when it is built (an unknown name fails at once), then scores
batches. With ``workers >= 1`` the rewards run in a `rewards.sandbox.WorkerPool` (per-item wall-clock
deadline, memory limit, kill-and-replace); ``workers=0`` runs them in this process, which enforces
no deadline and is meant for debugging trusted rewards only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rewards.registry import RewardSpec, resolve
from rewards.run import ERROR, OK, TIMEOUT, run_item

log = logging.getLogger(__name__)

class RewardError(RuntimeError):
    """A reward function failed and ``fail_fast`` asked the run to stop."""


@dataclass
class ScoreResult:
    """``total``: weighted sum per completion over rewards that applied (not None);
    ``per_function``: each reward's values (None: does not apply; timeouts and errors carry the
    configured scores); ``metrics``: ``reward/<name>`` (mean over applicable samples),
    ``reward/<name>/timeouts`` and ``reward/<name>/errors`` (counts in this call), and
    ``reward/<name>/<reason>`` for each reason the function lists in its ``reasons`` attribute
    (how many of its values in this call came with that reason, e.g.
    ``reward/math_answer/unreadable``)."""

    total: list[float]
    per_function: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)


def is_correct(scores: Mapping[str, float | None], correct: Sequence[str]) -> bool:
    """The one definition of a correct completion, for training metrics and evaluation alike:
    every reward named in `correct` (a recipe's `eval.correct`) scored exactly 1.0.

    >>> is_correct({"math_answer": 1.0, "format": 1.0}, ["math_answer", "format"])
    True
    >>> is_correct({"math_answer": 1.0, "format": None}, ["math_answer", "format"])  # "does not apply" is not 1.0
    False
    """
    return all(scores.get(name) == 1.0 for name in correct)


def run_items_inline(items, stop_on_error: bool = False):
    """In-process execution of items (see `rewards.run`): one ``(status, value, msg)`` each."""
    out: list = [None] * len(items)
    for k, item in enumerate(items):
        out[k] = run_item(item, bounded=False)
        if stop_on_error and out[k][0] == ERROR:
            break
    return out


class Scorer:
    """Scores completions with a weighted list of rewards.

    >>> with Scorer([RewardSpec("math_answer"), RewardSpec("format", 0.5)], workers=0) as s:
    ...     r = s.score(["<think>3+4 is 7</think><answer>7</answer>", "<answer>8</answer>"],
    ...                 [{"answer": "7"}, {"answer": "7"}])
    >>> r.total, r.per_function["math_answer"], r.metrics["reward/format"]
    ([1.5, 0.0], [1.0, 0.0], 0.5)
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        *,
        workers: int = 2,
        timeout_s: float = 2.0,
        memory_mb: int = 1024,
        timeout_score: float = 0.0,
        error_score: float = 0.0,
        fail_fast: bool = False,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is listed twice: {names}")
        self.specs = list(specs)
        self.functions = {s.name: resolve(s.name) for s in self.specs}  # fails here if unknown
        self.timeout_s, self.timeout_score, self.error_score = timeout_s, timeout_score, error_score
        self.fail_fast = fail_fast
        self.pool = None
        if workers > 0:
            from rewards.sandbox import WorkerPool

            modules = ["rewards.registry", "rewards.run"] + sorted({f.__module__ for f in self.functions.values()} - {"__main__"})
            self.pool = WorkerPool(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, preload=modules)

    def score(self, completions: list[str], examples: list[dict], contexts: list[dict] | None = None) -> ScoreResult:
        n = len(completions)
        if len(examples) != n or (contexts is not None and len(contexts) != n):
            raise ValueError(f"{n} completions but {len(examples)} examples / contexts of another length")
        contexts = [dict(c or {}) for c in contexts] if contexts is not None else [{} for _ in range(n)]
        items = [
            (spec.name, dict(spec.kwargs), completions[i], examples[i], contexts[i])
            for spec in self.specs
            for i in range(n)
        ]
        if self.pool is not None:
            results = self.pool.run(items, stop_on_error=self.fail_fast)
        else:
            results = run_items_inline(items, stop_on_error=self.fail_fast)
        if self.fail_fast:
            self._raise_first_failure(results, contexts, n)

        per_function: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        total = [0.0] * n
        for j, spec in enumerate(self.specs):
            values: list[float | None] = []
            timeouts = errors = 0
            failures: dict[str, list] = {}  # message -> the samples that failed with it
            reasons = dict.fromkeys(getattr(self.functions[spec.name], "reasons", ()), 0)  # always logged
            for i in range(n):
                status, value, msg = results[j * n + i]
                if status == OK and msg in reasons:
                    reasons[msg] += 1
                if status == TIMEOUT:
                    timeouts += 1
                    value = self.timeout_score
                elif status == ERROR:
                    errors += 1
                    failures.setdefault(msg, []).append(contexts[i].get("sample_id", i))
                    value = self.error_score
                values.append(value)
                if value is not None:
                    total[i] += spec.weight * value
            applicable = [v for v in values if v is not None]
            per_function[spec.name] = values
            metrics[f"reward/{spec.name}"] = sum(applicable) / len(applicable) if applicable else float("nan")
            metrics[f"reward/{spec.name}/timeouts"] = float(timeouts)
            metrics[f"reward/{spec.name}/errors"] = float(errors)
            for reason, count in reasons.items():
                metrics[f"reward/{spec.name}/{reason}"] = float(count)
            if timeouts:  # one line a reward a call, not one a sample
                log.warning("reward %s timed out (> %.1f s) on %d of %d samples", spec.name, self.timeout_s, timeouts, n)
            if errors:
                _log_failures(spec.name, errors, n, failures)
        return ScoreResult(total=total, per_function=per_function, metrics=metrics)

    def _raise_first_failure(self, results, contexts, n) -> None:
        for k, r in enumerate(results):
            if r is not None and r[0] == ERROR:
                spec, i = self.specs[k // n], k % n
                sid = contexts[i].get("sample_id", i)
                raise RewardError(f"reward {spec.name!r} failed on sample {sid}: {r[2]} (rewards.fail_fast is true)")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _log_failures(name: str, errors: int, n: int, failures: dict[str, list], most: int = 5) -> None:
    """One line a reward a call, then one a distinct message (at most `most`), naming a few samples."""
    log.error("reward %s failed on %d of %d samples", name, errors, n)
    for msg, samples in list(failures.items())[:most]:
        shown = ", ".join(str(s) for s in samples[:3]) + (f" and {len(samples) - 3} more" if len(samples) > 3 else "")
        log.error("  %s: %s", shown, msg)
    if len(failures) > most:
        log.error("  and %d more distinct errors", len(failures) - most)
