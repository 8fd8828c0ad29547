"""The watchdog: a run never hangs in silence.

Every long-lived process of a run (each trainer rank, the generation process of an asynchronous
run) starts one. A daemon thread reads the process's phase (`grpo.phases`: generate, score, learn,
push weights, checkpoint, evaluate, wait for batch, wait for weights, collective) and the time since
its last progress, once a second:

- every `HEARTBEAT_S` it writes `OUTPUT_DIR/watchdog/<role>-rank<R>.json` (phase, step, seconds
  without progress, pid), so that a process waiting for another can name the one that is stuck;
- after `trainer.stall_warn_s` without progress: one line on stderr naming the process, its rank,
  phase, step and seconds, and the Python stack of every thread in
  `OUTPUT_DIR/watchdog/stacks-<role>-rank<R>-step<S>-<time>.txt`. A rank waiting in a collective
  (or a trainer waiting for its batch) adds which other process is stalled, and in what, from
  their heartbeats (ranks on one node, or a run directory on a shared file system);
- after `trainer.stall_stop_s`: the line that says the run stopped, the stacks again, the
  process's children killed, and exit status `EXIT_STALLED` (5). Nothing is written on the way
  out: the last checkpoint stays as it was (checkpoints are written atomically) and
  `grpo train ... --resume auto` continues from it.

Each warning and stop is also appended to `OUTPUT_DIR/watchdog/events.jsonl` (for the dashboard).
The thresholds count seconds without progress, not phase length: the transformers engine beats
every decode step and the update every micro-batch, so only a generation call of the vLLM engine
(one beat when it returns) or a single collective can be long and still healthy; the defaults
(30 minutes, 3 hours) leave room for R1-length generations.
"""

from __future__ import annotations

import faulthandler
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from grpo import phases

EXIT_STALLED = 5
HEARTBEAT_S = 2.0
WATCHDOG_DIR = "watchdog"
TIMELINE_DIR = "timeline"
EVENTS_FILE = "events.jsonl"  # in WATCHDOG_DIR
WAITING = ("collective", "wait for batch", "wait for weights")  # phases that wait for another process


def timeline_path(output_dir: str | Path, role: str, rank: int) -> Path:
    """Where a process's phase spans go (`grpo.phases.record_to`; drawn by the dashboard)."""
    return Path(output_dir) / TIMELINE_DIR / f"{role}-rank{rank}.jsonl"


class Watchdog:
    """Watch this process (`role`: "trainer" or "generation"; `rank` of `world`) and write into
    `output_dir`/watchdog. `on_stop(line)` runs just before the process exits for a stall (the
    generation process tells the trainer). A context manager: the thread runs inside the block."""

    def __init__(self, output_dir: str | Path, *, warn_s: float | None, stop_s: float | None, rank: int = 0,
                 world: int = 1, role: str = "trainer", on_stop: Callable[[str], None] | None = None):
        self.dir = Path(output_dir) / WATCHDOG_DIR
        self.warn_s, self.stop_s = warn_s, stop_s
        self.rank, self.world, self.role, self.on_stop = rank, world, role, on_stop
        self.interval = min(1.0, min(s for s in (warn_s, stop_s, 4.0) if s) / 4)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._last_heartbeat = -math.inf

    @property
    def who(self) -> str:
        return f"{self.role} rank {self.rank}" if self.world > 1 else ("generation process" if self.role == "generation"
                                                                       else "trainer")

    def __enter__(self) -> Watchdog:
        if self.warn_s or self.stop_s:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._loop, name="grpo-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._heartbeat_path().unlink(missing_ok=True)

    # --- the thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.check(phases.now())

    def check(self, now: phases.Now) -> None:
        """One look at the process (the thread calls it every `interval`; tests call it directly)."""
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_S:
            self._heartbeat(now)
        if self.warn_s and now.idle_s < self.warn_s:
            self._warned = False
        if self.stop_s and now.idle_s >= self.stop_s:
            self._stop(now)
        elif self.warn_s and now.idle_s >= self.warn_s and not self._warned:
            self._warned = True
            stacks = self._dump_stacks(now)
            line = (f"grpo: {self.who} has made no progress in phase {now.phase!r} for {now.idle_s:.0f} s (step "
                    f"{now.step}; trainer.stall_warn_s={self.warn_s:g}){self._culprit(now)}; Python stacks of every "
                    f"thread: {stacks}")
            self._say(line, "stall", now, stacks)

    def _stop(self, now: phases.Now) -> None:
        from grpo.run.checkpoint import latest

        stacks = self._dump_stacks(now)
        last = latest(self.dir.parent)
        line = (f"grpo: stopped: {self.who} made no progress in phase {now.phase!r} for {now.idle_s:.0f} s (step "
                f"{now.step}; trainer.stall_stop_s={self.stop_s:g}){self._culprit(now)}; stacks: {stacks}; "
                + (f"last checkpoint {last}; continue with --resume auto" if last else "no checkpoint was written"))
        self._say(line, "stop", now, stacks)
        if self.on_stop is not None:
            try:
                self.on_stop(line)
            except Exception:  # noqa: BLE001 - the stop goes on whatever the callback does
                pass
        kill_children()
        sys.stderr.flush()
        os._exit(EXIT_STALLED)

    # --- what it writes -------------------------------------------------------------------------

    def _say(self, line: str, kind: str, now: phases.Now, stacks: Path) -> None:
        print(line, file=sys.stderr, flush=True)
        event = {"time": time.time(), "kind": kind, "role": self.role, "rank": self.rank, "step": now.step,
                 "phase": now.phase, "seconds": round(now.idle_s, 1), "stacks": stacks.name}
        try:
            with open(self.dir / EVENTS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        except OSError:
            pass

    def _dump_stacks(self, now: phases.Now) -> Path:
        path = self.dir / f"stacks-{self.role}-rank{self.rank}-step{now.step}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"{self.who} (pid {os.getpid()}), phase {now.phase!r}, step {now.step}, "
                        f"{now.idle_s:.0f} s without progress\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        return path

    def _heartbeat_path(self) -> Path:
        return self.dir / f"{self.role}-rank{self.rank}.json"

    def _heartbeat(self, now: phases.Now) -> None:
        self._last_heartbeat = time.monotonic()
        beat = {"pid": os.getpid(), "role": self.role, "rank": self.rank, "phase": now.phase, "step": now.step,
                "idle_s": round(now.idle_s, 1), "time": time.time()}
        from grpo.run.checkpoint import write_atomic  # torch: loaded by the run already, not by the dashboard

        try:
            write_atomic(self._heartbeat_path(), json.dumps(beat))
        except OSError:
            pass

    def _culprit(self, now: phases.Now) -> str:
        """For a process that waits for others: which of them is stalled (from their heartbeats)."""
        if now.phase not in WAITING:
            return ""
        found = []
        for path in sorted(self.dir.glob("*-rank*.json")):
            if path == self._heartbeat_path():
                continue
            try:
                beat = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            name = (f"{beat['role']} rank {beat['rank']}" if beat["role"] == "trainer" or self.world > 1
                    else "the generation process")
            silent = time.time() - beat["time"]
            if silent > max(10.0, 5 * HEARTBEAT_S):
                found.append(f"{name} gave no heartbeat for {silent:.0f} s (gone?)")
            elif beat["phase"] not in WAITING and beat["idle_s"] >= min(self.warn_s or now.idle_s, now.idle_s) / 2:
                found.append(f"{name} is stalled in phase {beat['phase']!r} for {beat['idle_s']:.0f} s")
        return ": " + "; ".join(found) if found else ""


def kill_children() -> None:
    """SIGKILL every descendant of this process (reward workers, the generation process, engines)."""
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for child in multiprocessing.active_children():
        child.kill()


def _descendants(root: int) -> list[int]:
    """Descendant pids of `root` from /proc (Linux); [] elsewhere."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
