"""The sandbox worker: runs inside bubblewrap under the system Python, standard library only.

It is not imported by the trainer: `rollout.tools.sandbox` reads this file's text and starts it
with ``python -I -S -c``. Protocol, one JSON line each way on the worker's stdin/stdout (moved to
fds 3 and 4 at start, so that the jobs cannot reach them): the worker says ``{"ready": pid}``;
then per job it reads ``{"code", "timeout_s", "cpu_s", "memory_mb", "processes", "file_mb",
"output_bytes"}`` and answers ``{"status", "output", "exit", "seconds"}``.

A job runs in a forked child in its own session: rlimits on CPU seconds, address space,
processes (counted inside the sandbox's user namespace), file size, open files and core dumps;
stdin is /dev/null, stdout and stderr one pipe. The worker reads that pipe up to the output cap
and the wall deadline; past either it kills the child's process group. Under bubblewrap (the
worker is not pid 1 but the only other process it may signal is bubblewrap's init, which ignores
signals from inside) it then kills every process it can (``kill(-1, SIGKILL)``), which ends
whatever the job left behind, wherever it moved itself, and empties the private /tmp: each job
starts from the same state.

Statuses: ``ok`` (exit 0), ``error`` (an exception or a non-zero exit), ``timeout`` (wall deadline
or CPU limit), ``output_limit`` (more output than allowed), ``killed`` (another signal).
"""

import json
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback

IN_FD, OUT_FD = 3, 4


def _limits(job):
    cpu = max(1, int(job["cpu_s"]))
    memory = int(job["memory_mb"]) << 20
    files = int(job["file_mb"]) << 20
    for what, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                        (resource.RLIMIT_FSIZE, (files, files)), (resource.RLIMIT_CORE, (0, 0)),
                        (resource.RLIMIT_NOFILE, (64, 64)),
                        (resource.RLIMIT_NPROC, (int(job["processes"]), int(job["processes"])))):
        resource.setrlimit(what, value)


def _child(job, write_fd):
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.closerange(3, 65536)
    os.chdir("/tmp")
    _limits(job)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.argv = ["<code>"]
    code = 0
    try:
        exec(compile(job["code"], "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - the job's own error, shown to the policy
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop the worker's frame
        sys.stderr.write("".join(traceback.format_exception(type(e), e, tb)))
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code & 0xFF)


def _read_output(read_fd, job, start):
    """Bytes of the child's output, and "timeout" / "output_limit" / None."""
    cap, deadline = int(job["output_bytes"]), start + float(job["timeout_s"])
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        ready, _, _ = select.select([read_fd], [], [], left)
        if not ready:
            continue
        data = os.read(read_fd, 65536)
        if not data:
            return b"".join(chunks), None
        chunks.append(data)
        size += len(data)
        if size > cap:
            return b"".join(chunks)[:cap], "output_limit"


def _others():
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]


def _clean(sweep):
    if not sweep:
        return
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.kill(-1, signal.SIGKILL)  # everything else this sandbox user may signal (not us, not init)
        except ProcessLookupError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap our own children
                pass
        except ChildProcessError:
            pass
        if not _others():
            break
        time.sleep(0.002)
    for root in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _run(job, sweep):
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            _child(job, write_fd)
        finally:
            os._exit(127)
    os.close(write_fd)
    output, cut = _read_output(read_fd, job, start)
    os.close(read_fd)
    if cut is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    _clean(sweep)
    exit_code = os.waitstatus_to_exitcode(status)
    if cut is not None:
        verdict = cut
    elif exit_code == 0:
        verdict = "ok"
    elif exit_code == -signal.SIGXCPU:  # the CPU-seconds limit
        verdict = "timeout"
    elif exit_code < 0:
        verdict = "killed"
    else:
        verdict = "error"
    return {"status": verdict, "output": output.decode("utf-8", errors="replace"), "exit": exit_code,
            "seconds": round(seconds, 4)}


def main(sweep):
    os.dup2(0, IN_FD)
    os.dup2(1, OUT_FD)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    reader = os.fdopen(IN_FD, "r", encoding="utf-8")
    writer = os.fdopen(OUT_FD, "w", encoding="utf-8")
    writer.write(json.dumps({"ready": os.getpid()}) + "\n")
    writer.flush()
    for line in reader:
        job = json.loads(line)
        writer.write(json.dumps(_run(job, sweep)) + "\n")
        writer.flush()


if __name__ == "__main__":
    main(sweep=len(sys.argv) > 1 and sys.argv[1] == "sweep")
