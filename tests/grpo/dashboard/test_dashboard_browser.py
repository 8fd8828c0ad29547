"""The dashboard in real headless Chromium (Debian's /usr/bin/chromium driven by playwright).

RUNS_DIR for these tests holds:
- the run under test: a real run of the tiny-cpu recipe made here by the CLI
  (`grpo train recipes/tiny-cpu.yaml trainer.steps=4 ...`), or the run GRPO_DASHBOARD_RUN_DIR
  points at;
- a "hostile" run whose completions are HTML/script payloads, to show that nothing executes.
To build it from a run made inside a fixture, call `build_runs_dir(tmp, real_run_dir=that_run)`.

Screenshots go to pytest's tmp dir and, if GRPO_SCREENSHOT_DIR is set, there as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from grpo.dashboard.server import Dashboard
from grpo.dashboard.synthetic import KNOWN_COMPLETION, XSS_PAYLOADS, write_synthetic_run

CHROMIUM = os.environ.get("GRPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} missing: apt-get install chromium chromium-driver")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")

# Charts the page must draw for a run that logs every key the training loop writes.
HOSTILE_RUN = 'hostile <img src=x onerror="window.__xss=5"> %2e%2e'  # a run name is untrusted too
EXPECTED_CURVES = {"reward", "reward_fn", "accuracy", "length", "truncated", "entropy", "kl", "clip", "ratio",
                   "grad_norm", "lr", "time"}


def build_runs_dir(base: Path, real_run_dir: Path | None = None) -> dict:
    """RUNS_DIR = {the run under test, a hostile run}; returns where the known completion is."""
    runs = base / "runs"
    if real_run_dir is not None:
        # Copied (a symlink out of RUNS_DIR would, rightly, not be served).
        shutil.copytree(real_run_dir, runs / "real", ignore=shutil.ignore_patterns("final", "checkpoint*", "wandb"))
        name = "real"
        step_files = sorted((runs / name / "rollouts").glob("step-*.jsonl"))
        step = int(step_files[-1].stem.split("-")[1])
        known = json.loads(step_files[-1].read_text(encoding="utf-8").splitlines()[-1])["completion"]
    else:
        name = "synthetic"
        write_synthetic_run(runs / name, steps=30, rollout_every=5, groups=2, group_size=4, moe_layers=2)
        step = 30
        known = json.loads((runs / name / "rollouts" / "step-000030.jsonl").read_text().splitlines()[-1])["completion"]
    write_synthetic_run(runs / HOSTILE_RUN, steps=10, rollout_every=5, groups=2, group_size=4, payloads=True, seed=7)
    return {"root": runs, "run": name, "step": step, "known": known}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    real = os.environ.get("GRPO_DASHBOARD_RUN_DIR")
    if not real:  # a real run of the tiny-cpu recipe, made by the CLI
        from tests.conftest import run_cli

        real = tmp_path_factory.mktemp("real") / "run"
        done = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", "eval.num_prompts=8",
                       "logging.rollouts_every=1", "logging.progress=false", "--output-dir", str(real))
        assert done.returncode == 0, done.stderr[-3000:]
    return build_runs_dir(tmp_path_factory.mktemp("dash"), Path(real))


@pytest.fixture(scope="module")
def server(runs):
    dash = Dashboard(runs["root"], port=0, poll_seconds=0.3).start()
    yield dash
    dash.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1400, "height": 900})
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    yield page
    page.close()


def js(page, expr: str, timeout: float = 30.0):
    """Poll `expr` until truthy (the page's CSP forbids eval, so no wait_for_function)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(f"() => ({expr})")
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def open_dashboard(page, url: str) -> dict:
    page.goto(url)
    timing = js(page, "window.grpoDashboard && (window.grpoDashboard.timing.ready || window.grpoDashboard.timing.error) && window.grpoDashboard.timing")
    assert timing and "error" not in timing, (timing, page.errors)
    return timing


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("GRPO_SCREENSHOT_DIR"):
        out = Path(os.environ["GRPO_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    assert path.stat().st_size > 10_000
    return path


def logged_keys(run_dir: Path) -> set[str]:
    """Metric keys with at least one value in the run (MoE per-expert shares go to heatmaps)."""
    keys = set()
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        keys |= {k for k, v in json.loads(line).items() if v is not None}
    return {k for k in keys - {"step", "time"} if not re.match(r"^moe/layer_\d+/expert_\d+/share$", k)}


def assert_all_charts_drawn(page, runs) -> list[dict]:
    report = page.evaluate("() => window.grpoDashboard.chartReport()")
    missing = [r for r in report if not (r["drawn"] and r["points"] > 0)]
    assert not missing, missing
    ids = {r["id"] for r in report}
    if runs["run"] == "synthetic":
        assert ids >= EXPECTED_CURVES, EXPECTED_CURVES - ids
    assert "aha-chart" in ids
    charted = {k for r in report for k in r["keys"]}
    assert logged_keys(runs["root"] / runs["run"]) <= charted  # every logged metric has a curve
    return report


def show_rollouts(page, run: str, step: int, search: str = "") -> str:
    page.select_option("#ro-run", run)
    js(page, f"document.getElementById('ro-step').options.length && document.getElementById('ro-run').value === {json.dumps(run)}")
    page.select_option("#ro-step", str(step))
    js(page, f"document.getElementById('ro-summary').textContent.includes('step {step}')")
    if search:
        page.fill("#ro-search", search)
        js(page, "document.getElementById('ro-summary').textContent.includes('1 completion')", timeout=5)
    return page.inner_text("#ro-list")


def assert_payloads_inert(page) -> None:
    assert page.evaluate("() => window.__xss") is None  # no payload ran
    listed = page.inner_text("#ro-list")  # rendered text, as a reader sees it
    for payload in XSS_PAYLOADS:
        assert payload in listed  # shown literally, as text
    # and no element came out of model text or the run's name
    assert page.evaluate("() => document.querySelectorAll('#ro-list img, #ro-list script, #ro-list svg, #ro-list textarea').length") == 0
    assert HOSTILE_RUN in page.inner_text("#run-picker")
    assert page.evaluate("() => document.querySelectorAll('header img, .chart img, .legend img').length") == 0


def test_live_page_draws_every_chart_and_shows_a_known_completion(page, server, runs, tmp_path):
    timing = open_dashboard(page, server.url)
    report = assert_all_charts_drawn(page, runs)
    assert any(r["id"].startswith("layer") for r in report) or runs["run"] == "real"  # MoE heatmaps
    text = show_rollouts(page, runs["run"], runs["step"], search=runs["known"][:40])
    assert runs["known"].strip()[:40] in text
    screenshot(page, tmp_path, "dashboard-live.png")
    assert not page.errors, page.errors
    print(f"first charts {timing['firstCharts']:.0f} ms, all {timing['allCharts']:.0f} ms")


def test_live_page_shows_hostile_completions_as_text(page, server, tmp_path):
    open_dashboard(page, server.url)
    show_rollouts(page, HOSTILE_RUN, 10)
    assert_payloads_inert(page)
    assert KNOWN_COMPLETION in page.inner_text("#ro-list")
    assert page.evaluate("() => document.querySelectorAll('#ro-list .turn-env').length") == 1  # turns shown apart
    assert page.evaluate("() => document.querySelectorAll('#ro-list .turn-code').length") == 1  # tool code apart too
    assert "tool output · error" in page.inner_text("#ro-list")
    # search across all steps on the server, results rendered the same way
    page.check("#ro-all")
    page.fill("#ro-search", "onerror")
    js(page, "document.getElementById('ro-summary').textContent.includes('all logged steps')")
    assert "onerror" in page.inner_text("#ro-list")
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('#ro-list img, #ro-list script').length") == 0
    screenshot(page, tmp_path, "dashboard-hostile.png")


def test_live_page_updates_while_a_run_writes(page, server, runs):
    import random

    from grpo.dashboard.synthetic import step_metrics, step_rollouts
    from grpo.run.tracking import JsonlSink

    open_dashboard(page, server.url)
    run_dir = runs["root"] / "growing"
    sink = JsonlSink(run_dir)  # a new run appears, then grows
    rng = random.Random(0)
    for step in range(1, 4):
        sink.log(step_metrics(step, 10, rng, 0, 0), step)
    js(page, "Object.keys(window.grpoDashboard.state.runs).includes('growing')", timeout=10)
    for step in range(4, 8):
        sink.log(step_metrics(step, 10, rng, 0, 0), step)
    sink.log_rollouts(step_rollouts(7, 1, 2, rng, False), 7)
    sink.close()
    assert js(page, "(window.grpoDashboard.state.runs.growing || {}).last_step === 7", timeout=10)
    # the reward chart (on screen) was redrawn with the new run's 7 steps
    assert js(page, "document.querySelector('[data-chart=reward]').data.some((t) => t.name.startsWith('growing') && t.x.length === 7)", timeout=10)
    assert js(page, "document.getElementById('ro-run').options.length >= 3", timeout=10)
    shutil.rmtree(run_dir)


def test_export_works_offline_and_shows_hostile_text_literally(page, runs, tmp_path):
    from grpo.dashboard.export import export_html

    out = export_html(runs["root"], tmp_path / "report.html")
    requested = []

    def only_the_file(route):
        requested.append(route.request.url)
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_the_file)
    open_dashboard(page, out.as_uri())
    assert_all_charts_drawn(page, runs)
    assert [u for u in requested if not u.startswith("file://")] == []
    show_rollouts(page, HOSTILE_RUN, 10)
    assert_payloads_inert(page)
    text = show_rollouts(page, runs["run"], runs["step"])
    assert runs["known"].strip()[:40] in text
    screenshot(page, tmp_path, "dashboard-export.png")
    assert not page.errors, page.errors


# --- the demo run: timeline, degenerate groups, per-token view, watchdog events ------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`grpo dashboard --demo`'s run, plus a hostile run with per-token data and a stalled live run."""
    from grpo.dashboard.synthetic import DEMO_RUN, write_demo_run, write_stall_event

    root = tmp_path_factory.mktemp("demo")
    write_demo_run(root)
    write_synthetic_run(root / "hostile", steps=5, rollout_every=5, groups=2, group_size=4, payloads=True, seed=7)
    stuck = write_synthetic_run(root / "stuck", steps=6, rollout_every=3, groups=1, group_size=2, moe_layers=0)
    write_stall_event(stuck, step=7, kind="stall", role="trainer", rank=0, phase="generate", seconds=60,
                      time=time.time())
    (stuck / "watchdog" / "trainer-rank0.json").write_text(json.dumps(  # its last heartbeat, a minute ago
        {"pid": 1, "role": "trainer", "rank": 0, "phase": "generate", "step": 7, "idle_s": 60.0, "time": time.time() - 60}))
    # one server per run (RUNS_DIR may be a single run): each page draws only the run under test
    served = {name: Dashboard(root / name, port=0, poll_seconds=0.3).start() for name in (DEMO_RUN, "hostile", "stuck")}
    yield {"url": {name: d.url for name, d in served.items()}, "root": root, "run": DEMO_RUN}
    for d in served.values():
        d.stop()


def test_demo_timeline_shows_every_process_side_by_side_with_waits_and_the_straggler(page, demo, tmp_path):
    open_dashboard(page, demo["url"][demo["run"]])
    assert js(page, "document.getElementById('tl-chart').data && document.getElementById('tl-chart').data.length", timeout=10)
    rows = page.evaluate("() => Array.from(new Set(document.getElementById('tl-chart').data.flatMap((t) => t.y)))")
    assert sorted(rows) == ["generation", "trainer rank 0", "trainer rank 1"]
    phases_drawn = page.evaluate("() => document.getElementById('tl-chart').data.map((t) => t.name)")
    assert {"generate", "learn", "wait for batch", "wait for weights", "collective"} <= set(phases_drawn)
    assert page.evaluate("() => document.querySelectorAll('#tl-chart .barlayer .point path').length") > 50
    report = {r["id"]: r for r in page.evaluate("() => window.grpoDashboard.chartReport()")}
    assert report["tl-chart"]["drawn"] and report["dg-chart"]["drawn"]
    # generation overlaps learning (asynchronous): some generate span starts before a learn span ends
    spans = page.evaluate("() => Object.fromEntries(document.getElementById('tl-chart').data.map((t) => [t.name, t.base.map((b, i) => [b, b + t.x[i]])]))")
    assert any(g0 < l1 and l0 < g1 for g0, g1 in spans["generate"] for l0, l1 in spans["learn"])
    # the stall event is a marker on the curves
    assert js(page, "(document.querySelector('[data-chart=reward]').layout.shapes || []).some((s) => s.x0 === 24)", timeout=5)
    assert page.is_hidden("#stall-banner")  # the demo is not stalled
    screenshot(page, tmp_path, "dashboard-timeline.png")
    assert not page.errors, page.errors


def test_degenerate_groups_lists_the_prompts_whose_rewards_were_all_equal(page, demo):
    open_dashboard(page, demo["url"][demo["run"]])
    show_rollouts(page, demo["run"], 60)
    rows = [json.loads(line) for line in (demo["root"] / demo["run"] / "rollouts" / "step-000060.jsonl").read_text().splitlines()]
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["reward"])
    degenerate = sorted(g for g, rewards in groups.items() if len(rewards) == 1)
    assert degenerate  # every third synthetic group is all solved
    assert f"{len(degenerate)} of {len(groups)} group(s) in step 60" in page.inner_text("#dg-summary")
    listed = page.inner_text("#dg-list")
    for g in degenerate:
        assert f"group {g} " in listed and next(r["prompt"] for r in rows if r["group"] == g) in listed
    assert page.evaluate("() => document.querySelectorAll('#dg-list li').length") == len(degenerate)
    assert page.evaluate("() => document.getElementById('dg-chart').data[0].meta") == "rollout/degenerate_groups_frac"


def test_per_token_view_colours_each_token_and_shows_hostile_text_as_text(page, demo, tmp_path):
    open_dashboard(page, demo["url"]["hostile"])
    show_rollouts(page, "hostile", 5)
    rows = [json.loads(line) for line in (demo["root"] / "hostile" / "rollouts" / "step-000005.jsonl").read_text().splitlines()]
    for i, payload in enumerate(XSS_PAYLOADS):
        page.click(f"#ro-list .tok-open >> nth={i}")
        js(page, f"document.querySelectorAll('#tok-view .tok').length === {len(rows[i]['token_text'])}", timeout=5)
        assert page.inner_text("#tok-view") == payload  # every token, as text
        assert page.evaluate("() => document.querySelectorAll('#tokens img, #tokens script, #tokens svg, #tokens textarea').length") == 0
        assert page.evaluate("() => window.__xss") is None
    assert page.inner_text("#tok-prompt") == rows[0]["prompt"]  # the prompt apart from the completion
    colours = {}
    for by in ("logprob", "ratio", "share", "entropy"):
        page.select_option("#tok-color", by)
        colours[by] = page.evaluate("() => Array.from(document.querySelectorAll('#tok-view .tok')).map((s) => s.style.backgroundColor)")
        assert all(c and c != "rgb(238, 238, 238)" for c in colours[by]), (by, colours[by])  # every value was logged
    assert len({tuple(c) for c in colours.values()}) == 4  # four different colourings
    assert "logprob" in page.get_attribute("#tok-view .tok >> nth=0", "title")
    screenshot(page, tmp_path, "dashboard-tokens.png")
    assert not page.errors, page.errors


def test_a_live_run_that_stalled_gets_a_banner(page, demo):
    open_dashboard(page, demo["url"]["stuck"])
    assert js(page, "!document.getElementById('stall-banner').hidden", timeout=5)
    text = page.inner_text("#stall-banner")
    assert "run stuck" in text and "trainer rank 0" in text and '"generate"' in text and "step 7" in text
    assert js(page, "(document.querySelector('[data-chart=reward]').layout.shapes || []).some((s) => s.x0 === 7)", timeout=5)


def test_grpo_dashboard_demo_serves_the_bundled_run(page, tmp_path):
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "grpo", "dashboard", "--demo", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        open_dashboard(page, f"http://127.0.0.1:{port}/")
        from grpo.dashboard.synthetic import DEMO_RUN

        assert page.inner_text("#run-picker").strip() == DEMO_RUN
        assert js(page, "document.getElementById('tl-chart').data && document.getElementById('ro-list').children.length", timeout=10)
        report = page.evaluate("() => window.grpoDashboard.chartReport()")
        assert not [r for r in report if not r["drawn"]]
        assert {"tl-chart", "dg-chart", "reward", "layer0"} <= {r["id"] for r in report}
        assert not page.errors, page.errors
    finally:
        proc.terminate()
        proc.wait(timeout=10)
