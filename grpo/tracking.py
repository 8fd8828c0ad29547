"""Where metrics and sampled rollouts go: one interface, several sinks.

`metrics.jsonl` in the run directory is always written and is the source of truth; other sinks
(console, experiment trackers) are views of it. Metric keys are namespaced: `train/`, `reward/`,
`rollout/`, `time/`, `moe/`, `eval/`.

Run-directory layout written here:
- `metrics.jsonl`: one JSON object per step, `{"step": int, "time": unix seconds, <key>: float}`.
- `rollouts/step-NNNNNN.jsonl`: every rollout of a logged step, one JSON object each.
- `rollouts.jsonl`: a small sample (the first group of each logged step) for reading with `tail`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_rollouts(self, rows: list[dict], step: int) -> None: ...

    def close(self) -> None: ...


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """Appends metrics and rollouts to files in the run directory (flushed every call)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        if not rows:
            return
        folder = self.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step-{step:06d}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        first_group = [r for r in rows if r.get("group") == rows[0].get("group")]
        with open(self.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
            for row in first_group:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._metrics.close()


class Tracker:
    """Fans each call out to every sink."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        for sink in self.sinks:
            sink.log_rollouts(rows, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_tracker(run_dir: str | Path) -> Tracker:
    return Tracker([JsonlSink(run_dir)])
