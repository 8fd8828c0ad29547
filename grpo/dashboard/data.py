"""Reading run directories for the dashboard: metrics, rollouts, MoE load, "aha" phrases, and what
the watchdog and the phase timeline write (`watchdog/`, `timeline/`, see `grpo/run/watchdog.py`).

Everything here is plain Python over the files the training loop writes (see `grpo/run/tracking.py`):
`metrics.jsonl` is parsed incrementally (only the bytes appended since the last read), curves are
downsampled on the server (min and max of each bucket kept, so spikes survive), and rollouts are
read one step at a time, only when asked for.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import unquote

DEFAULT_AHA_PHRASES = ("wait", "let me check", "re-evaluate", "double-check", "hmm", "verify")

MAX_POINTS = 1000  # per curve sent to the browser (min+max of MAX_POINTS/2 buckets)
MAX_HEATMAP_COLUMNS = 400
_EXPERT_SHARE = re.compile(r"^moe/layer_(\d+)/expert_(\d+)/share$")
_ROLLOUT_FILE = re.compile(r"^step-(\d+)\.jsonl$")
_TIMELINE_FILE = re.compile(r"^(trainer|generation)-rank(\d+)\.jsonl$")
_HEARTBEAT_FILE = re.compile(r"^(trainer|generation)-rank(\d+)\.json$")
TIMELINE_STEPS = 8  # recent steps drawn in the phase timeline
TAIL_BYTES = 512_000  # read at most this much of the end of a timeline or events file
MAX_EVENTS = 500
SILENT_S = 30.0  # a live run whose heartbeat is older than this is shown as stalled (it beats every 2 s)


class UnsafePath(ValueError):
    """A requested path that is not inside RUNS_DIR."""


def safe_join(root: Path, rel: str) -> Path:
    """`root / rel` if it stays inside `root` after decoding and resolving symlinks, else raise.

    Refuses absolute paths, `..` segments, backslashes, NUL and anything that still contains `%`
    after one round of percent-decoding (double-encoded traversal), then checks the resolved path.
    """
    text = unquote(rel)
    if "\x00" in text or "\\" in text or "%" in text:
        raise UnsafePath(rel)
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UnsafePath(rel)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(rel)
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise UnsafePath(rel)
    return path


def _num(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _round(value):
    return None if value is None else float(f"{value:.6g}")


def downsample(xs: list[int], ys: list, max_points: int = MAX_POINTS) -> tuple[list, list]:
    """Drop None, then keep at most `max_points` points: the min and max of each bucket, in order."""
    keep = [i for i, y in enumerate(ys) if y is not None]
    if len(keep) == len(ys):
        fx, fy = xs, ys
    else:
        fx, fy = [xs[i] for i in keep], [ys[i] for i in keep]
    n = len(fy)
    if n <= max_points:
        return list(fx), [_round(y) for y in fy]
    buckets = max_points // 2
    out_x, out_y = [], []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo == hi:
            continue
        seg = fy[lo:hi]
        i, j = seg.index(min(seg)), seg.index(max(seg))
        for k in ((i, j) if i < j else (j, i) if j < i else (i,)):
            out_x.append(fx[lo + k])
            out_y.append(_round(seg[k]))
    return out_x, out_y


def bucket_mean(xs: list[int], ys: list, columns: int) -> tuple[list, list]:
    """Mean of each of at most `columns` buckets (None ignored); x is the bucket's first step."""
    n = len(xs)
    if n <= columns:
        return list(xs), [_round(y) for y in ys]
    out_x, out_y = [], []
    for b in range(columns):
        lo, hi = b * n // columns, (b + 1) * n // columns
        vals = [y for y in ys[lo:hi] if y is not None]
        out_x.append(xs[lo])
        out_y.append(_round(sum(vals) / len(vals)) if vals else None)
    return out_x, out_y


class MetricsFile:
    """Columnar view of one `metrics.jsonl`, updated by reading only newly appended lines.

    A step logged again (a resumed run repeats the steps after its last checkpoint) replaces the
    earlier row of that step.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.steps: list[int] = []
        self.columns: dict[str, list] = {}
        self.row_of_step: dict[int, int] = {}
        self.sorted = True

    def refresh(self) -> bool:
        """Read appended lines; True when something changed."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if size < self.offset:  # truncated or replaced: start again
            self.__init__(self.path)
        if size == self.offset:
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return False  # a line still being written
        self.offset += end + 1
        for line in chunk[:end].split(b"\n"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                self._add(row)
        return True

    def _add(self, row: dict) -> None:
        step = row["step"]
        idx = self.row_of_step.get(step)
        if idx is None:
            idx = len(self.steps)
            if self.steps and step < self.steps[-1]:
                self.sorted = False
            self.steps.append(step)
            self.row_of_step[step] = idx
            for col in self.columns.values():
                col.append(None)
        else:
            for col in self.columns.values():
                col[idx] = None
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            col = self.columns.get(key)
            if col is None:
                col = self.columns[key] = [None] * len(self.steps)
            col[idx] = _num(value)

    def ordered(self) -> tuple[list[int], dict[str, list]]:
        if self.sorted:
            return self.steps, self.columns
        order = sorted(range(len(self.steps)), key=self.steps.__getitem__)
        return ([self.steps[i] for i in order],
                {k: [v[i] for i in order] for k, v in self.columns.items()})


def _json_rows(lines) -> list[dict]:
    """The lines that hold a JSON object (a cut or malformed line is skipped)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return _json_rows(f)


def _read_tail(path: Path, limit: int = TAIL_BYTES) -> list[dict]:
    """The JSON rows in the last `limit` bytes of a JSON-lines file (a cut first line is skipped)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            chunk = f.read(limit)
    except OSError:
        return []
    lines = chunk.split(b"\n")
    return _json_rows(lines[1:] if size > limit else lines)


def _phrase_pattern(phrase: str) -> re.Pattern:
    words = [re.escape(w) for w in phrase.lower().split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)")


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, stays inside `root` (what `safe_join` checks for URLs)."""
    real = path.resolve()
    return real == root or root in real.parents


class Run:
    """One run directory. Thread-safe: the HTTP server reads it from several threads. `root`: the
    served RUNS_DIR; a file of the run that resolves outside it (a symlink) is never read."""

    def __init__(self, name: str, path: Path, root: Path | None = None):
        self.name = name
        self.path = path
        self.root = (root or path).resolve()
        metrics = path / "metrics.jsonl"
        self.metrics = MetricsFile(metrics if inside(self.root, metrics) else path / ".refused-metrics.jsonl")
        self._lock = threading.Lock()
        self._payload = None
        self._payload_version = None
        self._payload_at = 0.0
        self._payload_cost = 0.0
        self._aha_cache: dict[tuple, dict] = {}

    # -- change detection -----------------------------------------------------------------
    def rollout_files(self) -> dict[int, Path]:
        folder = self.path / "rollouts"
        out = {}
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return out
        for name in names:
            m = _ROLLOUT_FILE.match(name)
            if m and inside(self.root, folder / name):  # a symlink out of RUNS_DIR is not a rollout file
                out[int(m.group(1))] = folder / name
        return dict(sorted(out.items()))

    def version(self) -> str:
        """Changes whenever metrics are appended or a rollout file appears."""
        try:
            msize = (self.path / "metrics.jsonl").stat().st_size
        except FileNotFoundError:
            msize = 0
        try:
            st = (self.path / "rollouts").stat()
            rver = f"{st.st_mtime_ns}"
        except FileNotFoundError:
            rver = "0"
        return f"{msize}-{rver}"

    # -- curves -----------------------------------------------------------------------------
    def payload(self, max_points: int = MAX_POINTS) -> dict:
        """Everything the curve and heatmap panels need, downsampled; cached per version."""
        with self._lock:
            version = self.version()
            if self._payload is not None and self._payload_version == version:
                return self._payload
            # A big run that is still writing: rebuild at most every 5x what a rebuild costs.
            if self._payload is not None and time.monotonic() - self._payload_at < 5 * self._payload_cost:
                return self._payload
            started = time.monotonic()
            self.metrics.refresh()
            steps, columns = self.metrics.ordered()
            series, layers = {}, {}
            for key, values in columns.items():
                m = _EXPERT_SHARE.match(key)
                if m:
                    layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = values
                    continue
                x, y = downsample(steps, values, max_points)
                if x:
                    series[key] = {"x": x, "y": y}
            moe = []
            for layer in sorted(layers):
                experts = layers[layer]
                z, x = [], []
                for e in range(max(experts) + 1):
                    x, row = bucket_mean(steps, experts.get(e, [None] * len(steps)), MAX_HEATMAP_COLUMNS)
                    z.append(row)
                moe.append({"layer": layer, "x": x, "z": z})
            self._payload = {
                "name": self.name,
                "version": version,
                "num_steps": len(steps),
                "last_step": steps[-1] if steps else None,
                "series": series,
                "moe": moe,
                "rollout_steps": list(self.rollout_files()),
            }
            self._payload_version = version
            self._payload_at = time.monotonic()
            self._payload_cost = self._payload_at - started
            return self._payload

    # -- rollouts ---------------------------------------------------------------------------
    def rollouts(self, step: int) -> list[dict]:
        path = self.rollout_files().get(step)
        return _read_jsonl(path) if path else []

    def search(self, query: str, limit: int = 200) -> list[dict]:
        """Rows of any step whose prompt or completion contains `query` (case-insensitive)."""
        needle = query.lower()
        found = []
        for _, path in reversed(self.rollout_files().items()):
            for row in _read_jsonl(path):
                text = f"{row.get('prompt') or ''}\n{row.get('completion') or ''}".lower()
                if needle in text:
                    found.append(row)
                    if len(found) >= limit:
                        return found
        return found

    # -- watchdog and phase timeline ---------------------------------------------------------
    def _files(self, folder: str, pattern: re.Pattern) -> list[tuple[re.Match, Path]]:
        try:
            names = sorted(os.listdir(self.path / folder))
        except OSError:
            return []
        return [(m, self.path / folder / n) for n in names
                if (m := pattern.match(n)) and inside(self.root, self.path / folder / n)]

    def timeline(self, steps: int = TIMELINE_STEPS) -> dict:
        """Phase spans of the last `steps` steps, per process (trainer ranks, the generation process):
        `{"processes": [{"role", "rank", "spans": [[step, phase, start, end], ...]}], "steps": [lo, hi]}`,
        times in seconds since the earliest span drawn."""
        processes, last = [], None
        for m, path in self._files("timeline", _TIMELINE_FILE):
            spans = [(r["step"], str(r["phase"]), float(r["start"]), float(r["end"])) for r in _read_tail(path)
                     if isinstance(r.get("step"), int) and _num(r.get("start")) is not None and _num(r.get("end")) is not None]
            processes.append({"role": m.group(1), "rank": int(m.group(2)), "spans": spans})
            if spans:
                last = max(last or 0, max(s[0] for s in spans))
        if last is None:
            return {"processes": [], "steps": None, "t0": None}
        lo = max(0, last - steps + 1)
        t0 = min((s[2] for p in processes for s in p["spans"] if s[0] >= lo), default=0.0)
        for p in processes:
            p["spans"] = [[st, ph, round(a - t0, 4), round(b - t0, 4)] for st, ph, a, b in p["spans"] if st >= lo]
        processes.sort(key=lambda p: (p["role"] != "trainer", p["rank"]))
        return {"processes": processes, "steps": [lo, last], "t0": t0}

    def events(self) -> list[dict]:
        """The watchdog's stall and stop events (`watchdog/events.jsonl`), the last `MAX_EVENTS`."""
        path = self.path / "watchdog" / "events.jsonl"
        if not inside(self.root, path):
            return []
        keys = ("time", "kind", "role", "rank", "step", "phase", "seconds")
        return [{k: r.get(k) for k in keys} for r in _read_tail(path)[-MAX_EVENTS:]
                if r.get("kind") in ("stall", "stop") and isinstance(r.get("step"), int)]

    def stalled(self, now: float | None = None) -> dict | None:
        """Why a live run looks stalled, or None: a process's heartbeat (written every 2 s while it
        runs, removed when it ends) older than `SILENT_S`, or a stop event after the last metrics."""
        now = time.time() if now is None else now
        events = self.events()
        for m, path in self._files("watchdog", _HEARTBEAT_FILE):
            try:
                beat = json.loads(path.read_text(encoding="utf-8"))
                age, idle = now - float(beat["time"]), float(beat["idle_s"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            who = {"role": m.group(1), "rank": int(m.group(2)), "phase": str(beat.get("phase")), "step": beat.get("step")}
            if age > SILENT_S:
                return {"kind": "silent", **who, "seconds": round(age)}
            warned = [e for e in events if e["kind"] == "stall" and (e["role"], e["rank"], e["step"]) ==
                      (who["role"], who["rank"], who["step"])]
            if warned and idle >= warned[-1]["seconds"]:  # warned about, and still no progress
                return {"kind": "stall", **who, "seconds": round(idle + age)}
        last_step = self.metrics.steps[-1] if self.metrics.steps else 0
        if events and events[-1]["kind"] == "stop" and events[-1]["step"] > last_step:
            return dict(events[-1])
        return None

    def watch(self, steps: int = TIMELINE_STEPS, live: bool = True) -> dict:
        """What the page polls besides curves: the timeline, the watchdog's events, stalled or not."""
        return {"timeline": self.timeline(steps), "events": self.events(), "stalled": self.stalled() if live else None}

    def aha(self, phrases: tuple[str, ...]) -> dict:
        """Per rollout step: fraction of completions containing each phrase, and mean length.

        `{"steps": [...], "rates": {phrase: [...]}, "length": [...]}`; length is mean `num_tokens`
        of the logged rollouts. Each step file is counted once and cached by (size, mtime).
        """
        patterns = {p: _phrase_pattern(p) for p in phrases}
        steps, rates, lengths = [], {p: [] for p in phrases}, []
        for step, path in self.rollout_files().items():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (step, st.st_size, st.st_mtime_ns, phrases)
            counts = self._aha_cache.get(key)
            if counts is None:
                rows = _read_jsonl(path)
                texts = [str(r.get("completion") or "").lower() for r in rows]
                toks = [r["num_tokens"] for r in rows if isinstance(r.get("num_tokens"), (int, float))]
                counts = {
                    "n": len(texts),
                    "hits": {p: sum(1 for t in texts if pat.search(t)) for p, pat in patterns.items()},
                    "length": sum(toks) / len(toks) if toks else None,
                }
                self._aha_cache[key] = counts
            if not counts["n"]:
                continue
            steps.append(step)
            for p in phrases:
                rates[p].append(_round(counts["hits"][p] / counts["n"]))
            lengths.append(_round(counts["length"]))
        return {"steps": steps, "rates": rates, "length": lengths}


class RunsDir:
    """RUNS_DIR: either one run directory or a folder of run directories (one level deep)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def _is_run(self, path: Path) -> bool:
        return (path / "metrics.jsonl").is_file() or (path / "rollouts").is_dir()

    def runs(self) -> list[Run]:
        """Discovered runs (re-scanned on each call, so new runs appear while serving)."""
        with self._lock:
            if self._is_run(self.root):
                found = {self.root.name or "run": self.root}
            else:
                found = {}
                try:
                    children = sorted(self.root.iterdir())
                except FileNotFoundError:
                    children = []
                for child in children:
                    # A symlinked run that points outside RUNS_DIR is not served.
                    real = child.resolve()
                    if self.root not in real.parents:
                        continue
                    if child.is_dir() and self._is_run(child):
                        found[child.name] = child
            for name, path in found.items():
                if name not in self._runs:
                    self._runs[name] = Run(name, path, self.root)
            return [self._runs[name] for name in found]

    def get(self, name: str) -> Run | None:
        for run in self.runs():
            if run.name == name:
                return run
        return None
