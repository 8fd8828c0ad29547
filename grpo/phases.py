"""What this process is doing now, for the watchdog (`grpo.run.watchdog`): a phase and its last progress.

Code marks the long parts of a run with `with phase("generate"): ...` and calls `beat()` where it
makes progress inside one (a micro-batch trained, a decode step taken). Phases nest (a collective
inside "learn"); the innermost one is current. Entering or leaving a phase is progress too.
The state is per process and cheap to update (one lock, two floats): with no watchdog running,
nothing reads it.

The phases a run goes through: generate, score, learn, push weights, checkpoint, evaluate,
wait for batch (asynchronous trainer), wait for weights (generation process), collective.

`record_to(path, role, rank)` also keeps a timeline: every phase span that ends (nested ones too)
as `{"role", "rank", "step", "phase", "start", "end"}` (wall clock, `time.time()`), buffered in
memory and appended to `path` (JSON lines) once per step, when `set_step` moves on. Bounded: spans
under `MIN_SPAN_S` are dropped, and when the file passes `MAX_TIMELINE_BYTES` its older half is cut
(the dashboard draws only the last steps).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_SPAN_S = 0.001  # shorter spans are not recorded
MAX_TIMELINE_BYTES = 4_000_000  # a timeline file past this keeps its newer half

_lock = threading.Lock()
_stack: list[tuple[str, float, float, int]] = []  # (phase, monotonic time entered, wall time entered, step)
_progress = time.monotonic()  # the last progress: a beat, or a phase entered or left
_step = 0  # the training step being worked on (0: before the first)
_recorder: _Recorder | None = None


class _Recorder:
    """Phase spans of this process, written to one JSON-lines file once per step."""

    def __init__(self, path: str | Path, role: str, rank: int):
        self.path, self.role, self.rank = Path(path), role, rank
        self.spans: list[dict] = []

    def add(self, name: str, start: float, end: float, step: int) -> None:
        if end - start >= MIN_SPAN_S:
            self.spans.append({"role": self.role, "rank": self.rank, "step": step, "phase": name,
                               "start": round(start, 4), "end": round(end, 4)})

    def flush(self) -> None:
        with _lock:
            spans, self.spans = self.spans, []
        if not spans:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(span) + "\n" for span in spans))
                size = f.tell()
            if size > MAX_TIMELINE_BYTES:
                self._cut()
        except OSError:  # a full disk loses timeline spans, never the run
            pass

    def _cut(self) -> None:
        data = self.path.read_bytes()
        keep = data[len(data) // 2:]
        keep = keep[keep.find(b"\n") + 1:]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_bytes(keep)
        os.replace(tmp, self.path)


def record_to(path: str | Path | None, role: str = "trainer", rank: int = 0) -> None:
    """Record this process's phase spans to `path` (None: stop, writing what is buffered)."""
    global _recorder
    with _lock:
        old, _recorder = _recorder, (_Recorder(path, role, rank) if path is not None else None)
    if old is not None:
        old.flush()


def flush() -> None:
    """Write the buffered spans now (`set_step` does it once per step)."""
    rec = _recorder
    if rec is not None:
        rec.flush()


@dataclass(frozen=True)
class Now:
    """A snapshot: the innermost phase ("idle" outside any), when it started, the step, and the
    seconds since the last progress."""

    phase: str
    phase_s: float
    step: int
    idle_s: float


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the code inside as phase `name` of this process."""
    global _progress
    with _lock:
        now = time.monotonic()
        _stack.append((name, now, time.time(), _step))
        _progress = now
    try:
        yield
    finally:
        with _lock:
            name, _, wall, step = _stack.pop()
            _progress = time.monotonic()
            if _recorder is not None:
                _recorder.add(name, wall, time.time(), step)


def beat() -> None:
    """Progress inside the current phase."""
    global _progress
    _progress = time.monotonic()  # one float store: atomic under the GIL, no lock needed


def set_step(step: int) -> None:
    """The step the process works on now (named in the watchdog's lines); progress too."""
    global _step, _progress
    _step, _progress = step, time.monotonic()
    flush()


def now() -> Now:
    with _lock:
        t = time.monotonic()
        name, since = _stack[-1][:2] if _stack else ("idle", _progress)
        return Now(name, t - since, _step, t - _progress)
