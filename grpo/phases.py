"""What this process is doing now, for the watchdog (`grpo.run.watchdog`): a phase and its last progress.

Code marks the long parts of a run with `with phase("generate"): ...` and calls `beat()` where it
makes progress inside one (a micro-batch trained, a decode step taken). Phases nest (a collective
inside "learn"); the innermost one is current. Entering or leaving a phase is progress too.
The state is per process and cheap to update (one lock, two floats): with no watchdog running,
nothing reads it.

The phases a run goes through: generate, score, learn, push weights, checkpoint, evaluate,
wait for batch (asynchronous trainer), wait for weights (generation process), collective.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

_lock = threading.Lock()
_stack: list[tuple[str, float]] = []  # (phase, monotonic time entered)
_progress = time.monotonic()  # the last progress: a beat, or a phase entered or left
_step = 0  # the training step being worked on (0: before the first)


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
        _stack.append((name, now))
        _progress = now
    try:
        yield
    finally:
        with _lock:
            _stack.pop()
            _progress = time.monotonic()


def beat() -> None:
    """Progress inside the current phase."""
    global _progress
    _progress = time.monotonic()  # one float store: atomic under the GIL, no lock needed


def set_step(step: int) -> None:
    """The step the process works on now (named in the watchdog's lines); progress too."""
    global _step, _progress
    _step, _progress = step, time.monotonic()


def now() -> Now:
    with _lock:
        t = time.monotonic()
        name, since = _stack[-1] if _stack else ("idle", _progress)
        return Now(name, t - since, _step, t - _progress)
