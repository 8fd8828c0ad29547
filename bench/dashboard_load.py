"""How fast the dashboard opens on a large run, measured in real headless Chromium.

    python bench/dashboard_load.py                  # 10,000 steps, 100,000 rollouts
    python bench/dashboard_load.py --steps 2000 --rollouts 20000 --export

Writes a synthetic run (through the training loop's `JsonlSink`: every metric key, a 4-layer x
8-expert MoE, rollouts every 10 steps), starts the dashboard server, warms it (parses the metrics
once, as `grpo dashboard` does on its first request), then opens the page in a fresh Chromium
profile and reads the page's own clock (`performance.now()`, from navigation start) when the first
charts are drawn. Prints one JSON line; `first_charts_s` is the figure (target: under 2 s).
Needs Debian's chromium (/usr/bin/chromium) and the playwright Python package; no GPU, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo.dashboard.server import Dashboard  # noqa: E402
from grpo.dashboard.synthetic import write_synthetic_run  # noqa: E402

CHROMIUM = os.environ.get("GRPO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_and_time(browser, url: str, timeout: float = 60.0) -> dict:
    page = browser.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    while True:
        timing = page.evaluate("() => window.grpoDashboard ? window.grpoDashboard.timing : null")
        if timing and (timing.get("ready") or timing.get("error")):
            break
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"dashboard not ready after {timeout} s: {timing}")
        time.sleep(0.1)  # the page keeps its own clock; polling less leaves the CPU to it
    report = page.evaluate("() => window.grpoDashboard.chartReport()")
    page.close()
    if timing.get("error"):
        raise RuntimeError(timing["error"])
    return {"timing": timing, "charts": len(report), "charts_drawn": sum(r["drawn"] for r in report)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--rollouts", type=int, default=100_000, help="total rollouts, logged every 10 steps")
    ap.add_argument("--export", action="store_true", help="also time the offline export and its opening")
    ap.add_argument("--repeat", type=int, default=3, help="first visits (fresh profiles); the median is reported")
    ap.add_argument("--keep", type=Path, default=None, help="write the run here and keep it")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "runs"
        run_dir = root / "big-run"
        every = 10
        logged = len([s for s in range(1, args.steps + 1) if s % every == 0 or s == args.steps])
        per_step = max(1, args.rollouts // max(logged, 1))
        t = time.perf_counter()
        if not (run_dir / "metrics.jsonl").exists():
            write_synthetic_run(run_dir, steps=args.steps, rollout_every=every, groups=max(1, per_step // 4),
                                group_size=min(4, per_step), moe_layers=4, experts=8)
        write_s = time.perf_counter() - t
        n_rollouts = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in (run_dir / "rollouts").glob("step-*.jsonl"))

        dash = Dashboard(root, port=0).start()
        t = time.perf_counter()
        dash.warm()
        warm_s = time.perf_counter() - t
        result = {"bench": "dashboard_load", "steps": args.steps, "rollouts": n_rollouts,
                  "metrics_mb": round((run_dir / "metrics.jsonl").stat().st_size / 1e6, 1),
                  "write_run_s": round(write_s, 2), "server_warm_s": round(warm_s, 2)}
        with sync_playwright() as pw:
            def fresh_browser(i: int):
                return pw.chromium.launch_persistent_context(
                    str(Path(tmp) / f"profile-{i}"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                    headless=True, viewport={"width": 1400, "height": 900})

            try:
                # Each opening in a fresh profile (empty cache): the first visit, `repeat` times.
                firsts = []
                for i in range(args.repeat):
                    ctx = fresh_browser(i)
                    live = open_and_time(ctx, dash.url)
                    firsts.append(live["timing"])
                    if i < args.repeat - 1:
                        ctx.close()
                ms = sorted(firsts, key=lambda t: t["firstCharts"])[len(firsts) // 2]  # the median opening
                result.update({"plotly_ready_s": round(ms["plotlyReady"] / 1000, 3),
                               "first_charts_s": round(ms["firstCharts"] / 1000, 3),
                               "first_charts_each_s": [round(t["firstCharts"] / 1000, 3) for t in firsts],
                               "all_charts_s": round(ms["allCharts"] / 1000, 3),
                               "ready_s": round(ms["ready"] / 1000, 3),
                               "charts": live["charts"], "charts_drawn": live["charts_drawn"]})
                # Opened again in the same profile: plotly.js comes from the browser cache.
                again = open_and_time(ctx, dash.url)
                result["revisit_first_charts_s"] = round(again["timing"]["firstCharts"] / 1000, 3)
                if args.export:
                    from grpo.dashboard.export import export_html

                    t = time.perf_counter()
                    out = export_html(root, Path(tmp) / "report.html")
                    result["export_s"] = round(time.perf_counter() - t, 2)
                    result["export_mb"] = round(out.stat().st_size / 1e6, 1)
                    exp = open_and_time(ctx, out.as_uri())
                    result["export_first_charts_s"] = round(exp["timing"]["firstCharts"] / 1000, 3)
                ctx.close()
            finally:
                dash.stop()
    result["under_2s"] = result["first_charts_s"] < 2.0
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
