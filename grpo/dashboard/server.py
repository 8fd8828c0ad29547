"""The live dashboard's HTTP server (stdlib `ThreadingHTTPServer`).

Routes (GET only):
- `/` the page; `/static/app.js`, `/static/app.css`, `/static/plotly.min.js` (from the plotly
  Python package, so no CDN is needed);
- `/api/runs` runs and their versions (the page polls it and refetches what changed);
- `/api/run?name=R` one run's downsampled curves, MoE heatmaps and rollout steps;
- `/api/rollouts?name=R&step=N`, `/api/search?name=R&q=TEXT`, `/api/aha?name=R&phrases=a,b`;
- `/api/watch?name=R` the phase timeline of the last steps, the watchdog's stall and stop events,
  and whether the run looks stalled now (polled, as it changes with the clock);
- `/files/<path>` a raw file under RUNS_DIR, always as `text/plain` (never rendered as HTML).

Security: binds 127.0.0.1 unless told otherwise; every file path goes through `safe_join` (no
`..`, absolute, percent-encoded or symlinked escape from RUNS_DIR); the page gets a strict
Content-Security-Policy (scripts only from this server) and inserts model text with
`textContent`; when bound to loopback, requests whose Host is not loopback are refused (DNS
rebinding).
"""

from __future__ import annotations

import json
import mimetypes
import threading
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from grpo.dashboard.data import DEFAULT_AHA_PHRASES, RunsDir, UnsafePath, safe_join

STATIC = Path(__file__).parent / "static"
IDLE_TIMEOUT_S = 30.0  # seconds a keep-alive connection may stay silent before it is closed

CSP_LIVE = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def plotly_js_path() -> Path:
    """The plotly.js bundle shipped inside the `plotly` Python package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package at {path}")
    return path


def page_html(config: dict, inline: dict[str, str] | None = None, csp: str | None = None) -> str:
    """The dashboard page. Live: scripts by URL. Export: `inline` holds the script/style texts."""
    template = (STATIC / "index.html").read_text(encoding="utf-8")
    config_json = json_for_html(config)
    if inline is None:
        # app.js first (small, starts fetching data), plotly.js deferred: both load in parallel.
        head = ('<link rel="stylesheet" href="/static/app.css">\n'
                '<script src="/static/app.js"></script>\n'
                '<script src="/static/plotly.min.js" defer></script>')
    else:
        head = (f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
                f'<style>{inline["css"]}</style>\n'
                f'<script type="application/json" id="grpo-data">{inline["data"]}</script>\n'
                f'<script>{inline["app"]}</script>\n'
                f'<script>{inline["plotly"]}</script>')
    template = template.replace("<!--CONFIG-->", f'<script type="application/json" id="grpo-config">{config_json}</script>')
    return template.replace("<!--HEAD-->", head)  # last: nothing is searched inside the inlined scripts


def json_for_html(value) -> str:
    """JSON that is safe inside a <script type="application/json"> element: no `<`, `>`, `&`."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class Handler(BaseHTTPRequestHandler):
    server_version = "grpo-dashboard"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # a connection that sends nothing for this long is closed (half-open clients)

    def __init__(self, *args, app: Dashboard, **kwargs):
        self.app = app
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):  # quiet: one line per error only
        if self.app.verbose:
            super().log_message(format, *args)

    # -- responses --------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        extra = dict(extra or {})
        self.send_header("Cache-Control", extra.pop("Cache-Control", "no-store"))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._send(status, message.encode(), "text/plain; charset=utf-8")

    # -- routing ----------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            self._route()
        except UnsafePath:
            self._error(HTTPStatus.FORBIDDEN, "path outside RUNS_DIR refused")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _route(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        # The raw request target, before any normalisation, is what gets checked.
        path, _, raw_query = self.path.partition("?")
        query = {k: v[-1] for k, v in parse_qs(raw_query).items()}
        if path == "/":
            body = page_html(self.app.page_config()).encode()
            return self._send(200, body, "text/html; charset=utf-8", {"Content-Security-Policy": CSP_LIVE})
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path.startswith("/files/"):
            return self._file(path[len("/files/"):])
        if path == "/api/runs":
            return self._json([{"name": r.name, "version": r.version()} for r in self.app.runs.runs()])
        if path.startswith("/api/"):
            run = self.app.runs.get(query.get("name", ""))
            if run is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such run")
            if path == "/api/run":
                return self._send(200, self.app.run_json(run), "application/json; charset=utf-8")
            if path == "/api/rollouts":
                try:
                    step = int(query.get("step", ""))
                except ValueError:
                    return self._error(HTTPStatus.BAD_REQUEST, "step must be an integer")
                return self._json({"step": step, "rows": run.rollouts(step)})
            if path == "/api/search":
                q = query.get("q", "")
                return self._json({"q": q, "rows": run.search(q) if q else []})
            if path == "/api/watch":
                return self._json(run.watch())
            if path == "/api/aha":
                phrases = tuple(p.strip() for p in query.get("phrases", "").split(",") if p.strip())
                return self._json(run.aha(phrases[:20] or self.app.aha_phrases))
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def _host_ok(self) -> bool:
        if self.app.host not in _LOOPBACK:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        return host in _LOOPBACK

    def _static(self, name: str) -> None:
        files = {"app.js": STATIC / "app.js", "app.css": STATIC / "app.css", "plotly.min.js": plotly_js_path()}
        if name not in files:
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        ctype = "text/css; charset=utf-8" if name.endswith(".css") else "text/javascript; charset=utf-8"
        self._send(200, files[name].read_bytes(), ctype, {"Cache-Control": "max-age=3600"})

    def _file(self, rel: str) -> None:
        path = safe_join(self.app.runs.root, rel)
        if not path.is_file():
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        ctype = mimetypes.guess_type(path.name)[0] or ""
        # Text files come back as plain text (never HTML, whatever their name); others as bytes.
        is_text = ctype.startswith("text/") or path.suffix in (".json", ".jsonl", ".yaml", ".yml", ".log")
        ctype = "text/plain; charset=utf-8" if is_text else "application/octet-stream"
        self._send(200, path.read_bytes(), ctype,
                   {"Content-Security-Policy": "default-src 'none'; sandbox", "Content-Disposition": "inline"})


class Dashboard:
    """RUNS_DIR served over HTTP. `start()` runs it on a thread (tests); `serve_forever()` blocks."""

    def __init__(self, runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8050,
                 aha_phrases: tuple[str, ...] = DEFAULT_AHA_PHRASES, poll_seconds: float = 2.0,
                 verbose: bool = False):
        self.runs = RunsDir(runs_dir)
        self.host = host
        self.aha_phrases = tuple(aha_phrases)
        self.poll_seconds = poll_seconds
        self.verbose = verbose
        self.httpd = ThreadingHTTPServer((host, port), partial(Handler, app=self))  # a busy port: OSError EADDRINUSE
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._json_cache: dict[str, tuple] = {}
        self._json_lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run_json(self, run) -> bytes:
        """`run.payload()` serialised, cached per run version (the page polls it)."""
        payload = run.payload()
        with self._json_lock:
            cached = self._json_cache.get(run.name)
            if cached is None or cached[0] is not payload:
                cached = (payload, json.dumps(payload, separators=(",", ":")).encode())
                self._json_cache[run.name] = cached
            return cached[1]

    def page_config(self) -> dict:
        return {"mode": "live", "aha_phrases": list(self.aha_phrases), "poll_ms": int(self.poll_seconds * 1000)}

    def warm(self) -> None:
        """Parse every run's metrics and count the default aha phrases now, so the first page
        load only sends cached answers."""
        for run in self.runs.runs():
            self.run_json(run)
        for run in self.runs.runs():
            run.aha(self.aha_phrases)

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for a serve loop, so only with one running
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
