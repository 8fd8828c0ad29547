"""The python tool's sandbox against hostile programs.

The items follow the categories of public sandbox test suites (escape-attempt suites of code
sandboxes, OpenAI human-eval's `reliability_guard` list, codejail's tests): reading and writing
outside, sockets (TCP and abstract Unix), fork bombs, endless loops, huge memory and output, a
full disk, signals to other processes, processes left behind, the worker itself attacked. Every
item must end within its deadline, change nothing outside, and leave the test process alive;
they run in parallel through the pool (a few seconds in all).
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from rollout.tools.sandbox import GRACE_S, Limits, PythonSandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make setup)")

LIMITS = Limits(timeout_s=1.5, cpu_s=2, memory_mb=256, processes=16, file_mb=4, output_bytes=2000, tmp_mb=16)


def _hostile(secret: str, outside: str, port: int, abstract: str, test_pid: int) -> dict[str, str]:
    return {
        "read_secret": f"print(open({secret!r}).read())",
        "read_root_home": "import os; print(os.listdir('/root'), os.listdir('/home'))",
        "write_outside": f"open({outside!r} + '/planted', 'w').write('x'); print('wrote')",
        "write_etc": "open('/etc/grpo-planted', 'w').write('x')",
        "tcp_to_host": f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=1); s.send(b'hi')",
        "dns": "import socket; print(socket.getaddrinfo('example.com', 80))",
        "unix_abstract": f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({abstract!r}); s.send(b'hi')",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "endless_loop": "while True:\n    pass",
        "sleep_forever": "import time; time.sleep(10_000)",
        "huge_memory": "x = bytearray(8 << 30)",
        "growing_memory": "x = []\nwhile True:\n    x.append(bytearray(1 << 20))",
        "huge_output": "while True:\n    print('y' * 1000)",
        "fill_disk": "f = open('/tmp/big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))",
        "kill_test": f"import os, signal; os.kill({test_pid}, signal.SIGKILL)",
        "kill_everything": "import os, signal; os.kill(-1, signal.SIGKILL); print('sent')",
        "kill_worker": "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "stop_self": "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)",
        "daemon_left_behind": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')",
        "threads_spin": "import threading\nfor _ in range(8):\n    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n"
                        "for t in threading.enumerate()[1:]:\n    t.join()",
        "worker_pipes": "import os\nfor fd in (3, 4):\n    os.write(fd, b'{\"status\": \"ok\"}\\n')",
        "proc_of_test": f"print(open('/proc/{test_pid}/environ').read())",
    }


def test_hostile_programs_end_in_time_and_change_nothing(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's secret")
    outside = tmp_path / "outside"
    outside.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    abstract = f"\0grpo-sandbox-test-{os.getpid()}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(abstract)
    unix.listen(4)
    unix.setblocking(False)
    items = _hostile(str(secret), str(outside), listener.getsockname()[1], abstract, os.getpid())
    with PythonSandbox(workers=len(items) // 2, limits=LIMITS, hide=[str(tmp_path)]) as box:
        start = time.monotonic()
        results = dict(zip(items, box.run_many(list(items.values()))))
        took = time.monotonic() - start
        after_job = box.run("import os\nprint(sorted(os.listdir('/tmp')), len([p for p in os.listdir('/proc') if p.isdigit()]))")
        pids = box.pids()
    for name, r in results.items():  # every item ends within its deadline (and the trainer's grace)
        assert r.seconds <= LIMITS.timeout_s + GRACE_S, (name, r)
    assert "the trainer's secret" not in results["read_secret"].output
    assert results["read_secret"].status == "error"
    assert results["read_root_home"].output.strip() == "[] []"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and secret.read_text() == "the trainer's secret"
    assert not os.path.exists("/etc/grpo-planted") and results["write_etc"].status == "error"
    for conn in (listener, unix):
        with pytest.raises(BlockingIOError):
            conn.accept()  # nobody connected
    for name in ("tcp_to_host", "dns", "unix_abstract", "kill_test", "proc_of_test", "huge_memory", "worker_pipes"):
        assert results[name].status == "error", (name, results[name])
    for name in ("endless_loop", "sleep_forever", "stop_self"):
        assert results[name].status == "timeout", (name, results[name])
    for name in ("fork_bomb", "threads_spin", "growing_memory", "fill_disk"):  # bounded, whichever limit hits first
        assert results[name].status != "ok", (name, results[name])
    assert results["huge_output"].status == "output_limit" and len(results["huge_output"].output) <= LIMITS.output_bytes
    assert results["kill_worker"].status == "killed"
    assert results["daemon_left_behind"].output == "parent done\n"
    # the next job finds an empty /tmp and no process but bubblewrap's init and itself (+ the worker)
    assert after_job.status == "ok" and after_job.output == "[] 3\n", after_job
    assert took < 3 * (LIMITS.timeout_s + GRACE_S)
    for pid in pids:  # closed: no worker left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    listener.close()
    unix.close()


def test_plain_program_output_and_error():
    with PythonSandbox(workers=1, limits=LIMITS) as box:
        ok = box.run("print(123456789 * 987654321)")
        bad = box.run("def f():\n    return 1 / 0\nf()")
    assert (ok.status, ok.output) == ("ok", "121932631112635269\n")
    assert bad.status == "error" and bad.output.endswith("ZeroDivisionError: division by zero\n")
    assert 'File "<code>", line 2, in f' in bad.output and "worker" not in bad.output


def test_missing_bubblewrap_refuses_unless_unsandboxed(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="unsandboxed=true"):
        PythonSandbox(workers=1, limits=LIMITS)
    with caplog.at_level("WARNING"), PythonSandbox(workers=1, limits=LIMITS, unsandboxed=True) as box:
        assert box.run("print(2 + 2)").output == "4\n"
    assert "UNSANDBOXED" in caplog.text


def test_grpo_sandbox_prints_what_the_policy_would_see(tmp_path, capsys):
    from grpo.cli import main

    program = tmp_path / "program.py"
    program.write_text("import os\nprint(6 * 7, os.listdir('/tmp'))\nraise SystemExit(3)\n")
    assert main(["sandbox", str(program), "rollout.tools.sandbox.timeout_s=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["<output>42 []", "</output>"]
    assert out[-1] == '{"status": "error", "exit_code": 3, "seconds": ' + out[-1].split('"seconds": ')[1]
    program.write_text("while True:\n    pass\n")
    assert main(["sandbox", str(program), "rollout.tools.sandbox.timeout_s=0.5"]) == 0  # the override is used
    assert capsys.readouterr().out.splitlines()[-1].startswith('{"status": "timeout", "exit_code": -9')
