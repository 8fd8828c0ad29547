"""A pool of worker processes that runs rewards on untrusted text with hard limits.

Layout: the parent starts one *zygote*, a fresh ``python`` (no torch, no model, no ``__main__``
re-import) that imports the built-in rewards once and then forks a worker whenever the parent asks,
so starting or replacing a worker takes milliseconds. Each worker connects back to the parent over
a private Unix socket, proves it with a random token, lowers its address-space limit
(``RLIMIT_AS`` = ``memory_mb``) and serves chunks of items.

Deadlines: the parent hands an idle worker a chunk of items in one message; the worker sends back
each item's result as soon as it is done. An item's clock starts when the parent sees the previous
result of that worker (or sends the chunk). When the current item of a worker passes ``timeout_s``
of wall-clock time, the parent SIGKILLs the worker (this also stops one huge integer operation,
which ``signal.alarm`` cannot), scores the item as a timeout, asks the zygote for a replacement and
resubmits the rest of the chunk. A worker that dies (a crash in C code, say) costs only its
current item, scored as an error.

Cleanup: `close` stops workers and the zygote; if the parent dies, the zygote sees EOF on its stdin
and exits, and workers are killed by ``PR_SET_PDEATHSIG`` when the zygote goes.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait

from rewards.run import ERROR, TIMEOUT, run_item

# imported once in the zygote, so a new worker starts warm (the default: every built-in reward); a
# module's `warm_up()`, if it has one, runs there too (fixed inputs of its own, never model text)
PRELOAD = ["rewards.registry", "rewards.run", "rewards.math", "rewards.format", "rewards.countdown", "math_verify"]
NEEDS = {"rewards.math.reward": ["math_verify"], "rewards.reasoning_gym": ["reasoning_gym"]}  # optional modules a reward module imports lazily
CONNECT_TIMEOUT_S = 30.0


class SandboxError(RuntimeError):
    """The worker pool could not start or replace a worker."""


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process exits (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- worker side


def _serve(conn: Connection, memory_mb: int) -> None:
    """The worker loop: receive a chunk [(index, item)], answer (index, status, value, msg) each."""
    import resource

    limit = int(memory_mb) * 1024 * 1024
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, item in chunk:
            out = (index, *run_item(item, bounded=True, memory_mb=memory_mb))
            try:
                conn.send(out)
            except (OSError, ValueError):
                return


def _worker_process(address: str, token: str, memory_mb: int) -> None:
    die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    conn = Connection(sock.detach())
    conn.send((token, os.getpid()))
    _serve(conn, memory_mb)


def _zygote_main() -> None:
    """Entry of the zygote process: preload, then fork one worker per line read from stdin."""
    import importlib
    import json

    die_with_parent()
    # Ctrl-C and a scheduler's SIGTERM are the trainer's to handle: it stops the pool itself, and
    # the workers (forked from here) must not print their own KeyboardInterrupt tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cfg = json.loads(sys.stdin.readline())
    for name in cfg["preload"]:
        try:
            module = importlib.import_module(name)
            warm_up = getattr(module, "warm_up", None)
            if callable(warm_up):  # a reward module's first-use costs, paid once here, not per worker
                warm_up()
        except Exception:  # noqa: BLE001 - a module that fails here fails again, reported, in the worker
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker_process(cfg["address"], cfg["token"], cfg["memory_mb"])
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)


# ---------------------------------------------------------------- parent side


class _Worker:
    __slots__ = ("pid", "conn", "pending", "started")

    def __init__(self, pid: int, conn: Connection):
        self.pid = pid
        self.conn = conn
        self.pending: deque[int] = deque()  # indices sent and not yet answered, in order
        self.started = 0.0  # when the current (first pending) item started, parent clock


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _shutdown(state: dict) -> None:
    if os.getpid() != state["owner"]:  # a forked child (a DataLoader worker, say) leaves the pool alone
        return
    for w in state["workers"]:
        try:
            w.conn.send(None)
            w.conn.close()
        except (OSError, ValueError):
            pass
        _kill(w.pid)
    state["workers"].clear()
    zygote = state.get("zygote")
    if zygote is not None and zygote.poll() is None:
        try:
            zygote.stdin.close()
        except OSError:
            pass
        try:
            zygote.wait(2.0)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait(2.0)
    if state.get("listener") is not None:
        state["listener"].close()
    shutil.rmtree(state["tmpdir"], ignore_errors=True)


class WorkerPool:
    """Runs reward items ``(name, kwargs, completion, example, context)`` in sandboxed workers.

    `run` returns one ``(status, value, message)`` per item, in order; status is ``"ok"``,
    ``"timeout"`` or ``"error"``.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 2.0, memory_mb: int = 1024, chunks_per_worker: int = 2,
                 preload: list[str] | None = None):
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.chunks_per_worker = chunks_per_worker
        modules = list(PRELOAD if preload is None else preload)
        self.preload = modules + [m for mod in modules for m in NEEDS.get(mod, []) if m not in modules]
        self.replaced = 0  # workers killed on a deadline or found dead since start
        self.spawned_pids: list[int] = []  # every worker ever started (for leak checks)
        self.last_item_seconds: list[float] = []  # wall-clock seconds per item of the last `run`
        self._token = secrets.token_hex(16)
        tmpdir = tempfile.mkdtemp(prefix="grpo-rewards-")
        os.chmod(tmpdir, 0o700)
        self._address = os.path.join(tmpdir, "pool.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._address)
        listener.listen(64)
        listener.settimeout(CONNECT_TIMEOUT_S)
        self._listener = listener
        self._state = {"workers": [], "zygote": None, "listener": listener, "tmpdir": tmpdir, "owner": os.getpid()}
        self._finalizer = weakref.finalize(self, _shutdown, self._state)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.getcwd()])
        self._zygote = subprocess.Popen(
            [sys.executable, "-c", "from rewards.sandbox import _zygote_main; _zygote_main()"],
            stdin=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._state["zygote"] = self._zygote
        import json

        self._zygote.stdin.write(
            json.dumps({"preload": self.preload, "address": self._address, "token": self._token, "memory_mb": self.memory_mb})
            + "\n"
        )
        self._zygote.stdin.flush()
        self._workers: list[_Worker] = self._state["workers"]
        for _ in range(workers):
            self._workers.append(self._start_worker())

    def _start_worker(self) -> _Worker:
        if self._zygote.poll() is not None:
            raise SandboxError(f"the reward zygote exited (code {self._zygote.returncode})")
        try:
            self._zygote.stdin.write("fork\n")
            self._zygote.stdin.flush()
            sock, _ = self._listener.accept()
        except (TimeoutError, OSError) as e:
            raise SandboxError(f"could not start a reward worker: {e}") from None
        sock.settimeout(None)
        conn = Connection(sock.detach())
        if not conn.poll(CONNECT_TIMEOUT_S):
            raise SandboxError("a reward worker connected but never said hello")
        token, pid = conn.recv()
        if token != self._token:
            conn.close()
            raise SandboxError("a process with the wrong token connected to the reward pool")
        self.spawned_pids.append(pid)
        return _Worker(pid, conn)

    def _replace(self, w: _Worker) -> _Worker:
        _kill(w.pid)
        try:
            w.conn.close()
        except OSError:
            pass
        new = self._start_worker()
        self._workers[self._workers.index(w)] = new
        self.replaced += 1
        return new

    def pids(self) -> list[int]:
        """Process ids of the current workers and the zygote (for leak checks)."""
        return [w.pid for w in self._workers] + [self._zygote.pid]

    def run(self, items: list, stop_on_error: bool = False) -> list[tuple[str, object, str]]:
        """Results in item order. With ``stop_on_error`` the first error (or timeout) ends the run at
        once: busy workers are replaced and the items not yet scored stay ``None``."""
        if not self._workers:
            raise RuntimeError("the pool is closed")
        results: list = [None] * len(items)
        seconds = [0.0] * len(items)
        self.last_item_seconds = seconds
        failed = [False]
        size = max(1, -(-len(items) // (len(self._workers) * self.chunks_per_worker)))
        todo: deque[list[int]] = deque(list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size))

        def feed(w: _Worker) -> None:
            while todo and not w.pending:
                chunk = todo.popleft()
                try:
                    w.conn.send([(i, items[i]) for i in chunk])
                except (OSError, ValueError):  # dead worker: replace it and try again
                    todo.appendleft(chunk)
                    w = self._replace(w)
                    continue
                w.pending.extend(chunk)
                w.started = time.monotonic()

        def requeue_rest(w: _Worker) -> None:
            rest = list(w.pending)
            w.pending.clear()
            if rest:
                todo.appendleft(rest)

        for w in list(self._workers):
            feed(w)
        while any(w.pending for w in self._workers):
            busy = [w for w in self._workers if w.pending]
            wait_s = max(0.0, min(w.started for w in busy) + self.timeout_s - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            by_conn = {id(w.conn): w for w in busy}
            for conn in ready:
                w = by_conn[id(conn)]
                try:
                    while w.pending and w.conn.poll():
                        index, status, value, msg = w.conn.recv()
                        results[index] = (status, value, msg)
                        failed[0] = failed[0] or status == ERROR
                        now = time.monotonic()
                        seconds[index] = now - w.started
                        if w.pending and w.pending[0] == index:
                            w.pending.popleft()
                        w.started = now
                except (EOFError, OSError):  # the worker died: its current item is an error
                    lost = w.pending.popleft()
                    results[lost] = (ERROR, None, "the worker process died (crash or memory limit)")
                    failed[0] = True
                    seconds[lost] = time.monotonic() - w.started
                    requeue_rest(w)
                    w = self._replace(w)
                if not w.pending:
                    feed(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.pending and now - w.started > self.timeout_s:
                    late = w.pending.popleft()
                    results[late] = (TIMEOUT, None, f"over the {self.timeout_s:g} s deadline")
                    seconds[late] = now - w.started
                    requeue_rest(w)
                    feed(self._replace(w))
            if stop_on_error and failed[0]:
                todo.clear()
                for w in list(self._workers):
                    if w.pending:
                        w.pending.clear()
                        self._replace(w)
                break
            for w in list(self._workers):  # resubmitted work goes to whoever is idle
                if not w.pending:
                    feed(w)
        return results

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
