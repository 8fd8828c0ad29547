"""Run untrusted Python (the policy's tool calls) in bubblewrap, with a pool of warm workers.

Each worker is one ``bwrap`` process holding the system Python (``python -I -S``, standard library
only) that runs `rollout.tools.worker`; jobs are forked from it, so a call costs a fork, not an
interpreter start. What a job can see and do:

- a new user, PID, network, IPC, UTS and cgroup namespace (``--unshare-all``): no network at all
  (only a loopback that is down), no view of, or signal to, any process outside;
- bubblewrap itself runs as an unprivileged user (`SANDBOX_UID`, "nobody") when the trainer is
  root, so the process limit counts the sandbox's own processes and nothing outside is writable;
- the root file system read-only; a private, size-bounded tmpfs at /tmp (also /var/tmp, /dev/shm);
  a fresh /proc and a minimal /dev; empty tmpfs over the trainer's working directory, home, /root,
  /home, /run, /mnt, /media, /srv, /sys and any `hide` paths (the run directory, the data);
- an empty environment (``PATH``, ``HOME=/tmp``, ``LANG`` only);
- per job: rlimits on CPU seconds, address space, processes, file size, open files; an output cap;
  a wall-clock deadline after which the job's process group is killed; after every job, every
  process the job left is killed and /tmp emptied (see `rollout.tools.worker`).

The trainer side keeps its own deadline too: a worker that does not answer within the job's
deadline plus `GRACE_S` is killed with its whole namespace and replaced; a worker that dies is
replaced. `run` is thread-safe; `run_many` runs jobs in parallel over the pool.

Without bubblewrap (or where it cannot create namespaces) `PythonSandbox` refuses to start unless
``unsandboxed=True``, which runs the same worker as a plain process (rlimits and deadlines only:
no file-system, network or process isolation) and says so with a warning on every start.

    with PythonSandbox(workers=2) as box:
        box.run("print(6 * 7)")   # ToolResult(status='ok', output='42\\n', ...)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SANDBOX_UID = 65534  # "nobody": bubblewrap runs as this user when the trainer is root
GRACE_S = 2.0  # the trainer's deadline for a worker's answer: the job's deadline plus this
START_TIMEOUT_S = 20.0
WORKER_SOURCE = (Path(__file__).parent / "worker.py").read_text()
HIDDEN = ("/home", "/root", "/run", "/mnt", "/media", "/srv", "/sys")  # always covered by an empty tmpfs
STATUSES = ("ok", "error", "timeout", "output_limit", "killed")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces here (and unsandboxed was not asked for)."""


@dataclass(frozen=True)
class ToolResult:
    """What one run produced: status (one of `STATUSES`), its output (stdout and stderr, as one
    stream, cut at the output cap), the exit code (negative: the signal) and wall seconds."""

    status: str
    output: str
    exit_code: int
    seconds: float


@dataclass(frozen=True)
class Limits:
    """Per-job limits (see `grpo.config.ToolSandboxConfig` for their documentation)."""

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    processes: int = 16
    file_mb: int = 16
    output_bytes: int = 8192
    tmp_mb: int = 64


def bwrap_command(python: str, hide: list[str], tmp_mb: int) -> list[str]:
    """The bubblewrap command line of one worker (its program follows)."""
    cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
           "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
           "--setenv", "LANG", "C.UTF-8"]
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        cmd += ["--size", str(tmp_mb << 20), "--tmpfs", path]
    interpreter = os.path.realpath(python)
    private = ("/tmp/", "/var/tmp/", "/dev/shm/")  # already fresh tmpfs: nothing of the host shows there
    for path in sorted({os.path.realpath(p) for p in (*HIDDEN, *hide) if p and os.path.isdir(p)}):
        if (path.rstrip("/") + "/").startswith(private):
            continue
        if path == "/" or interpreter.startswith(path.rstrip("/") + "/"):
            raise SandboxUnavailable(f"cannot hide {path}: the sandbox's Python ({interpreter}) lives there")
        cmd += ["--tmpfs", path]
    return [*cmd, "--chdir", "/tmp"]


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="sandbox worker reader").start()

    def wait_ready(self) -> None:
        ready = self._answer(START_TIMEOUT_S)
        if ready is None or "ready" not in ready:
            err = self._stderr()
            self.kill()
            raise SandboxUnavailable("the sandbox worker did not start" + (f": {err}" if err else ""))

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.answers.put(json.loads(line))
            except ValueError:
                break
        self.answers.put(None)

    def _answer(self, timeout: float) -> dict | None:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            return None

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return (self.proc.stderr.read() or "").strip()[-500:]

    def run(self, code: str, limits: Limits) -> ToolResult | None:
        """The job's result, or None when the worker died or missed the trainer's deadline."""
        job = {"code": code, "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
               "processes": limits.processes, "file_mb": limits.file_mb, "output_bytes": limits.output_bytes}
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None
        got = self._answer(limits.timeout_s + GRACE_S)
        if got is None:
            return None
        return ToolResult(got["status"], got["output"], int(got["exit"]), float(got["seconds"]))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap and its init; the namespace dies with them
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


class PythonSandbox:
    """A pool of warm sandbox workers that run Python source and return `ToolResult`s.

    Args:
        workers: warm workers (jobs beyond that wait for a free one).
        limits: per-job limits.
        python: the interpreter inside the sandbox (the system Python: the trainer's environment
            lives under its working directory, which the sandbox hides).
        hide: more directories to cover with an empty tmpfs (the run directory, data).
        unsandboxed: run without bubblewrap (rlimits and deadlines only), with a warning on every start.
    """

    def __init__(self, workers: int = 2, limits: Limits | None = None, python: str = "/usr/bin/python3",
                 hide: list[str] | None = None, unsandboxed: bool = False):
        if workers < 1:
            raise ValueError("a PythonSandbox needs at least one worker")
        self.limits = limits or Limits()
        self.unsandboxed = unsandboxed
        self.replaced = 0  # workers killed on a deadline or found dead
        as_user = SANDBOX_UID if os.geteuid() == 0 else None
        program = [python, "-I", "-S", "-c", WORKER_SOURCE]
        if unsandboxed:
            logger.warning("the python tool runs UNSANDBOXED (recipe: rollout.tools.sandbox.unsandboxed=true): "
                           "model-written code runs with rlimits and deadlines only, with this machine's file "
                           "system, network and processes in reach")
            self._argv = program
        else:
            if shutil.which("bwrap") is None:
                raise SandboxUnavailable("bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (make "
                                         "setup does), or set rollout.tools.sandbox.unsandboxed=true to run model "
                                         "code without a sandbox")
            hidden = [os.getcwd(), os.path.expanduser("~"), *(hide or [])]
            self._argv = [*bwrap_command(python, hidden, self.limits.tmp_mb), *program, "sweep"]
        self._as_user = as_user
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._spawn_requests: queue.Queue = queue.Queue()
        self._spawner = threading.Thread(target=self._spawn_loop, daemon=True, name="sandbox spawner")
        self._spawner.start()
        try:
            with ThreadPoolExecutor(workers) as ex:
                for w in ex.map(lambda _: self._start(), range(workers)):
                    self._idle.put(w)
        except SandboxUnavailable as e:
            self.close()
            hint = "" if unsandboxed else (" (bubblewrap could not create its namespaces here?); set "
                                           "rollout.tools.sandbox.unsandboxed=true to run without a sandbox")
            raise SandboxUnavailable(f"{e}{hint}") from None

    def _spawn_loop(self) -> None:
        """Start worker processes, on this one long-lived thread: bubblewrap's --die-with-parent is
        tied to the thread that started it, so a worker started from a short-lived thread (a thread
        pool's) would be killed when that thread ends."""
        while True:
            reply = self._spawn_requests.get()
            if reply is None:
                return
            try:
                reply.put(subprocess.Popen(
                    self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    encoding="utf-8", start_new_session=True, user=self._as_user, group=self._as_user,
                    extra_groups=[] if self._as_user is not None else None))
            except OSError as e:
                reply.put(e)

    def _start(self) -> _Worker:
        reply: queue.Queue = queue.Queue()
        self._spawn_requests.put(reply)
        proc = reply.get()
        if isinstance(proc, OSError):
            raise SandboxUnavailable(f"could not start the sandbox worker: {proc}")
        w = _Worker(proc)
        w.wait_ready()
        with self._lock:
            self._all.append(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)
            self.replaced += 1

    def run(self, code: str) -> ToolResult:
        """Run one program (thread-safe; waits for a free worker)."""
        w = self._idle.get()
        start = time.monotonic()
        try:
            result = w.run(code, self.limits)
        except BaseException:
            self._retire(w)
            self._idle.put(self._start())
            raise
        if result is None:  # dead, or past the trainer's deadline: the worker and all it holds go
            late = time.monotonic() - start >= self.limits.timeout_s
            self._retire(w)
            w = self._start()
            result = ToolResult("timeout" if late else "killed", "", -signal.SIGKILL, time.monotonic() - start)
        self._idle.put(w)
        return result

    def run_many(self, codes: list[str]) -> list[ToolResult]:
        """Run programs in parallel over the pool; results in order."""
        if not codes:
            return []
        with ThreadPoolExecutor(max(1, len(self._all))) as ex:
            return list(ex.map(self.run, codes))

    def pids(self) -> list[int]:
        """Process ids of the workers' bubblewrap processes (for leak checks)."""
        with self._lock:
            return [w.proc.pid for w in self._all]

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), []
        for w in workers:
            w.kill()
        self._spawn_requests.put(None)

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
