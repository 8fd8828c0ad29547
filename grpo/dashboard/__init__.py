"""`grpo dashboard`: a live local dashboard for GRPO runs, and a self-contained HTML export.

    grpo dashboard runs/                       # serve http://127.0.0.1:8050/, updates live
    grpo dashboard runs/my-run --port 0        # any free port
    grpo dashboard runs/ --export report.html  # one offline file (plotly.js inlined)
    grpo dashboard --demo                      # a bundled example run, to look before training

RUNS_DIR is one run directory (with `metrics.jsonl`) or a folder of them (overlaid for comparison).
Nothing here needs a GPU or the network; on a cluster, forward the port over ssh
(`ssh -L 8050:127.0.0.1:8050 host`) rather than binding to 0.0.0.0.

Panels: curves (reward total and per function, accuracy, response length, truncation, entropy,
KL, clip fractions, importance ratios, gradient norm, learning rate, step-time split, and any other
logged key), MoE expert-load heatmaps per layer, "aha" phrase frequencies next to response length,
a rollout browser (step, group, completions with rewards and advantage, text search), a per-token
view of one completion (coloured by sampler logprob, trainer/sampler ratio, share of the advantage
or entropy), degenerate groups (all rewards equal) per step and which prompts they were, the phase
timeline of every process over the last steps, and the watchdog's stall and stop events (markers on
the curves; a banner when a live run has stalled).

The package: `grpo.dashboard.data` reads run directories (bounded, never outside RUNS_DIR),
`grpo.dashboard.server` serves the page and its JSON, `grpo.dashboard.export` writes the offline
file, `grpo.dashboard.synthetic` writes demo runs. May import: `grpo.run` (the run-directory
writer, for demo runs) and the floors below it; it never runs training.
"""

from __future__ import annotations

import argparse
import sys
import threading

from grpo.dashboard.data import DEFAULT_AHA_PHRASES

__all__ = ["add_parser", "main", "run"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", metavar="RUNS_DIR", nargs="?", help="a run directory, or a folder of run directories")
    p.add_argument("--demo", action="store_true",
                   help="show a small bundled example run (made on the spot, nothing is trained) instead of RUNS_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (0 picks a free one; default 8050)")
    p.add_argument("--export", metavar="REPORT.html", default=None,
                   help="write a self-contained offline HTML file instead of serving")
    p.add_argument("--aha-phrases", default=",".join(DEFAULT_AHA_PHRASES),
                   help="comma-separated reflection phrases to count in completions "
                        f"(default: {','.join(DEFAULT_AHA_PHRASES)})")
    p.add_argument("--export-rollout-steps", type=int, default=50,
                   help="with --export: embed rollouts of at most this many logged steps per run")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often the live page checks for new data")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `dashboard` on the `grpo` CLI's subparsers; the handler is `args.func(args) -> int`."""
    p = subparsers.add_parser("dashboard", help="live dashboard / HTML report for runs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    if args.demo == bool(args.runs_dir):
        print("grpo dashboard: give RUNS_DIR or --demo (one of them)", file=sys.stderr)
        return 2
    if args.demo:
        from grpo.dashboard.synthetic import write_demo_run

        with tempfile.TemporaryDirectory(prefix="grpo-demo-") as tmp:
            write_demo_run(tmp)
            return serve(Path(tmp), args)
    return serve(Path(args.runs_dir), args)


def serve(runs_dir, args: argparse.Namespace) -> int:
    """Serve (or, with --export, write) RUNS_DIR."""
    if not runs_dir.is_dir():
        print(f"grpo dashboard: {runs_dir} is not a directory", file=sys.stderr)
        return 2
    phrases = tuple(p.strip() for p in args.aha_phrases.split(",") if p.strip())
    if args.export:
        from grpo.dashboard.export import export_html

        out = export_html(runs_dir, args.export, aha_phrases=phrases, max_rollout_steps=args.export_rollout_steps)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    from grpo.dashboard.server import Dashboard

    dash = Dashboard(runs_dir, host=args.host, port=args.port, aha_phrases=phrases, poll_seconds=args.poll_seconds)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach it can read RUNS_DIR", file=sys.stderr)
    print(f"grpo dashboard: serving {dash.runs.root} at {dash.url} (Ctrl-C to stop)", flush=True)
    threading.Thread(target=dash.warm, daemon=True).start()  # parse big runs before the first visit
    try:
        dash.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dash.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))
