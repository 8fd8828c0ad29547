"""`grpo dashboard RUNS_DIR --export report.html`: the dashboard as one self-contained file.

plotly.js (from the plotly Python package), the page's script and style, and the data are all
inlined, so the file opens offline. Curves and MoE heatmaps are the same downsampled data the
live page gets; rollouts are embedded for at most `max_rollout_steps` logged steps per run (spread
evenly, always the first and the last), so a long run still makes a file of reasonable size.
A Content-Security-Policy in the page allows only its own inline scripts (by hash) and no
network access at all.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

from grpo.dashboard.data import DEFAULT_AHA_PHRASES, RunsDir
from grpo.dashboard.server import STATIC, json_for_html, page_html, plotly_js_path


def _spread(steps: list[int], k: int) -> list[int]:
    if len(steps) <= k:
        return list(steps)
    if k <= 1:
        return steps[-1:]
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def _script_safe(js: str) -> str:
    # An inline <script> ends at the first "</script"; JS never needs that literal sequence.
    return js.replace("</script", "<\\/script")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def export_html(runs_dir: str | Path, out: str | Path, aha_phrases=DEFAULT_AHA_PHRASES,
                max_rollout_steps: int = 50) -> Path:
    runs = RunsDir(runs_dir).runs()
    aha_phrases = tuple(aha_phrases)
    data = {"runs": [], "rollouts": {}, "aha": {}, "watch": {}}
    for run in runs:
        payload = dict(run.payload())
        keep = _spread(payload["rollout_steps"], max_rollout_steps)
        payload["rollout_steps"] = keep
        data["runs"].append(payload)
        data["rollouts"][run.name] = {str(step): run.rollouts(step) for step in keep}
        data["aha"][run.name] = run.aha(aha_phrases)
        data["watch"][run.name] = run.watch(live=False)  # a file is not live: no stalled banner
    plotly_js = _script_safe(plotly_js_path().read_text(encoding="utf-8"))
    app_js = _script_safe((STATIC / "app.js").read_text(encoding="utf-8"))
    csp = ("default-src 'none'; script-src " + _sha256(plotly_js) + " " + _sha256(app_js) + "; "
           "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
           "base-uri 'none'; form-action 'none'")
    config = {"mode": "export", "aha_phrases": list(aha_phrases),
              "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    inline = {"css": (STATIC / "app.css").read_text(encoding="utf-8").replace("</", "<\\/"),
              "plotly": plotly_js, "app": app_js, "data": json_for_html(data)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page_html(config, inline=inline, csp=csp), encoding="utf-8")
    return out
