"""Dashboard data reading and HTTP server without a browser: curves, rollouts, aha counts, and
refusal of every path outside RUNS_DIR."""

from __future__ import annotations

import argparse
import http.client
import json
import os

import pytest

from grpo.dashboard import add_parser, main
from grpo.dashboard.data import MetricsFile, Run, RunsDir, UnsafePath, downsample, safe_join
from grpo.dashboard.server import Dashboard
from grpo.dashboard.synthetic import XSS_PAYLOADS, write_synthetic_run

SECRET = "TOP-SECRET-OUTSIDE-RUNS-DIR"


@pytest.fixture
def served(tmp_path):
    """RUNS_DIR with two runs, a secret file next to it, and a symlink inside pointing at it."""
    (tmp_path / "secret.txt").write_text(SECRET)
    runs = tmp_path / "runs"
    write_synthetic_run(runs / "a", steps=12, rollout_every=4, payloads=True)
    write_synthetic_run(runs / "b", steps=8, rollout_every=4, moe_layers=0, seed=1)
    os.symlink(tmp_path / "secret.txt", runs / "a" / "link.txt")
    os.symlink(tmp_path, runs / "escape")  # a directory symlink out of RUNS_DIR
    dash = Dashboard(runs, port=0).start()
    yield dash
    dash.stop()


def get(dash, target: str, host: str | None = None) -> tuple[int, str, dict]:
    """Send `target` exactly as written (http.client does not normalise the path)."""
    conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
    conn.putrequest("GET", target, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{dash.port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read().decode("utf-8", "replace")
    conn.close()
    return resp.status, body, dict(resp.getheaders())


def test_binds_loopback_by_default(tmp_path):
    dash = Dashboard(tmp_path, port=0)
    try:
        assert dash.httpd.server_address[0] == "127.0.0.1"
    finally:
        dash.stop()


@pytest.mark.parametrize("target", [
    "/files/../secret.txt",
    "/files/a/../../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2E%2E%2Fsecret.txt",
    "/files/a/..%2f..%2fsecret.txt",
    "/files/%252e%252e/secret.txt",
    "/files//etc/passwd",
    "/files/%2Fetc%2Fpasswd",
    "/files/a/link.txt",
    "/files/escape/secret.txt",
    "/files/a\\..\\..\\secret.txt",
    "/files/a/%00/../../secret.txt",
    "/../secret.txt",
    "/static/../../../secret.txt",
])
def test_paths_outside_runs_dir_are_refused(served, target):
    status, body, _ = get(served, target)
    assert status in (403, 404), (target, status)
    assert SECRET not in body and "root:" not in body


def test_files_inside_runs_dir_are_served_as_plain_text(served):
    status, body, headers = get(served, "/files/a/rollouts/step-000004.jsonl")
    assert status == 200 and XSS_PAYLOADS[0] in body
    assert headers["Content-Type"].startswith("text/plain") and headers["X-Content-Type-Options"] == "nosniff"


def test_run_names_cannot_escape_either(served):
    assert get(served, "/api/run?name=../secret.txt")[0] == 404
    assert get(served, "/api/rollouts?name=escape&step=4")[0] == 404
    names = [r["name"] for r in json.loads(get(served, "/api/runs")[1])]
    assert names == ["a", "b"]


def test_dns_rebinding_host_is_refused(served):
    assert get(served, "/api/runs", host="evil.example:8050")[0] == 403
    assert get(served, "/api/runs", host=f"localhost:{served.port}")[0] == 200


def test_page_has_strict_csp(served):
    status, body, headers = get(served, "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"].split("script-src")[1].split(";")[0]


def test_api_serves_curves_rollouts_search_aha(served):
    run = json.loads(get(served, "/api/run?name=a")[1])
    assert run["num_steps"] == 12 and run["rollout_steps"] == [4, 8, 12]
    assert "reward/math_answer" in run["series"] and len(run["moe"]) == 2
    assert len(run["moe"][0]["z"]) == 8  # experts
    rows = json.loads(get(served, "/api/rollouts?name=a&step=8")[1])["rows"]
    assert len(rows) == 8 and rows[0]["completion"] == XSS_PAYLOADS[0]
    found = json.loads(get(served, "/api/search?name=a&q=onerror")[1])["rows"]
    assert {r["step"] for r in found} == {4, 8, 12}
    aha = json.loads(get(served, "/api/aha?name=a&phrases=wait,let%20me%20check")[1])
    assert aha["steps"] == [4, 8, 12] and set(aha["rates"]) == {"wait", "let me check"}


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.txt") == tmp_path.resolve() / "a" / "b.txt"
    for bad in ("../x", "/etc/passwd", "%2e%2e/x", "a/%2e%2e/%2e%2e/x", "%252e%252e/x", "a\\..\\x", "C:/x"):
        with pytest.raises(UnsafePath):
            safe_join(tmp_path, bad)


def test_downsample_keeps_spikes_and_drops_nulls():
    xs = list(range(10_000))
    ys = [0.0] * 10_000
    ys[1234] = 99.0
    ys[5000] = None
    dx, dy = downsample(xs, ys, max_points=100)
    assert len(dx) <= 100 and 99.0 in dy and 1234 in dx and None not in dy


def test_metrics_file_reads_increments_and_replaces_repeated_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')  # last line half-written
    m = MetricsFile(path)
    m.refresh()
    assert m.steps == [1, 2]
    with open(path, "a") as f:
        f.write(': 3.0}\n{"step": 2, "a": 20.0, "b": null}\n')  # resumed run repeats step 2
    assert m.refresh()
    steps, cols = m.ordered()
    assert steps == [1, 2, 3] and cols["a"] == [1.0, 20.0, 3.0] and cols["b"] == [None, None, None]


def test_aha_counts_whole_phrases_case_insensitively(tmp_path):
    rows = [{"completion": "Wait, let me check."}, {"completion": "await nothing"},
            {"completion": "LET ME\nCHECK again"}, {"completion": None}]
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step-000005.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    aha = Run("r", tmp_path).aha(("wait", "let me check"))
    assert aha["steps"] == [5] and aha["rates"] == {"wait": [0.25], "let me check": [0.5]}


def test_runs_dir_can_be_a_single_run(tmp_path):
    write_synthetic_run(tmp_path / "only", steps=3, rollout_every=3)
    assert [r.name for r in RunsDir(tmp_path / "only").runs()] == ["only"]


def test_cli_export_and_parser(tmp_path, capsys):
    write_synthetic_run(tmp_path / "runs" / "a", steps=5, rollout_every=5)
    assert main([str(tmp_path / "runs"), "--export", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Content-Security-Policy" in html and "connect-src 'none'" in html
    assert "<script src" not in html and "<link" not in html  # everything inlined, nothing fetched
    parser = argparse.ArgumentParser(prog="grpo")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", str(tmp_path), "--port", "0"])
    assert args.host == "127.0.0.1" and args.port == 0 and callable(args.func)
    assert main([str(tmp_path / "missing")]) == 2


def test_odd_run_names_are_listed_but_symlinked_runs_outside_are_not(tmp_path):
    outside = write_synthetic_run(tmp_path / "outside", steps=2, rollout_every=2)
    write_synthetic_run(tmp_path / "runs" / "100% <b>", steps=2, rollout_every=2)
    os.symlink(outside, tmp_path / "runs" / "linked")
    assert [r.name for r in RunsDir(tmp_path / "runs").runs()] == ["100% <b>"]


def test_api_routes_never_follow_a_symlinked_rollout_or_metrics_file_out_of_runs_dir(tmp_path):
    """/api/rollouts, /api/search and /api/run resolve run files the way /files does."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "step-000099.jsonl").write_text(json.dumps({"step": 99, "prompt": SECRET, "completion": SECRET}) + "\n")
    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "secret/metric": 42.0}) + "\n")
    runs = tmp_path / "runs"
    write_synthetic_run(runs / "a", steps=8, rollout_every=4)
    os.symlink(outside / "step-000099.jsonl", runs / "a" / "rollouts" / "step-000099.jsonl")
    (runs / "b" / "rollouts").mkdir(parents=True)
    os.symlink(outside / "metrics.jsonl", runs / "b" / "metrics.jsonl")
    dash = Dashboard(runs, port=0).start()
    try:
        assert json.loads(get(dash, "/api/rollouts?name=a&step=99")[1])["rows"] == []
        assert json.loads(get(dash, f"/api/search?name=a&q={SECRET}")[1])["rows"] == []
        assert json.loads(get(dash, "/api/run?name=a")[1])["rollout_steps"] == [4, 8]
        status, body, _ = get(dash, "/api/run?name=b")
        assert SECRET not in body and "secret/metric" not in body
        assert get(dash, "/files/a/rollouts/step-000099.jsonl")[0] == 403  # as /files always did
    finally:
        dash.stop()


def test_a_silent_connection_is_closed_after_the_idle_timeout(tmp_path, monkeypatch):
    import socket
    import time

    from grpo.dashboard import server

    monkeypatch.setattr(server.Handler, "timeout", 1.0)
    dash = Dashboard(tmp_path, port=0).start()
    try:
        sock = socket.create_connection(("127.0.0.1", dash.port), timeout=10)
        t = time.monotonic()
        assert sock.recv(1024) == b""  # the server closed it: nothing was ever sent
        assert time.monotonic() - t < 5
        sock.close()
        assert get(dash, "/api/runs")[0] == 200  # and it still serves others
    finally:
        dash.stop()


def test_a_busy_port_is_one_line_and_exit_2(tmp_path, capsys):
    import socket

    from grpo.cli import main as grpo_main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        code = grpo_main(["dashboard", str(tmp_path), "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert code == 2 and "port is already in use" in err and "Traceback" not in err, err


def test_watch_reads_the_timeline_tail_events_and_a_stalled_heartbeat(tmp_path):
    import time

    from grpo.dashboard.synthetic import write_stall_event

    run = write_synthetic_run(tmp_path / "r", steps=20, rollout_every=10, timeline=True)
    r = Run("r", run)
    r.payload()
    w = r.watch(steps=4)
    assert w["timeline"]["steps"] == [17, 20]
    assert {(p["role"], p["rank"]) for p in w["timeline"]["processes"]} == {("trainer", 0), ("trainer", 1), ("generation", 0)}
    assert all(17 <= s[0] <= 20 and 0 <= s[2] < s[3] for p in w["timeline"]["processes"] for s in p["spans"])
    assert [(e["kind"], e["step"]) for e in w["events"]] == [("stall", 20)]
    assert w["stalled"] is None  # no heartbeat: the run ended
    beat = {"pid": 1, "role": "generation", "rank": 0, "phase": "generate", "step": 21, "idle_s": 1.0}
    (run / "watchdog" / "generation-rank0.json").write_text(json.dumps({**beat, "time": time.time()}))
    assert r.stalled() is None  # beating
    (run / "watchdog" / "generation-rank0.json").write_text(json.dumps({**beat, "time": time.time() - 100}))
    assert r.stalled()["kind"] == "silent" and r.stalled()["role"] == "generation"
    (run / "watchdog" / "generation-rank0.json").unlink()
    write_stall_event(run, step=21, kind="stop", role="trainer", rank=1, phase="learn", seconds=900)
    assert r.stalled()["kind"] == "stop" and r.stalled()["rank"] == 1  # stopped after the last logged step


def test_demo_needs_no_runs_dir_and_refuses_both(tmp_path, capsys):
    assert main([str(tmp_path), "--demo"]) == 2
    assert "RUNS_DIR or --demo" in capsys.readouterr().err
    out = tmp_path / "demo.html"
    assert main(["--demo", "--export", str(out)]) == 0
    assert "demo-async-run" in out.read_text(encoding="utf-8")
