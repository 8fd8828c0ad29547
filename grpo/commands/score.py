"""`grpo score`: score a JSONL file of completions offline with one reward, in the sandbox.

CPU (any machine):
    grpo score completions.jsonl --reward math_answer [--gold-field answer]
        [--completion-field completion] [--out results.jsonl] [--workers 2] [--timeout-s 2]
GPU cluster: the same command; rewards run on CPUs only.

Each input line is a JSON object holding a completion (``--completion-field``) and the example
fields the reward reads (the gold answer under ``--gold-field``, passed to the reward as
``answer``; countdown rows carry ``target`` and ``numbers``; an optional ``prompt`` goes into the
context, as do ``finish_reason``, ``num_tokens`` and ``max_tokens`` if present). The last line on
stdout is one JSON object: ``{"n", "mean", "timeouts", "errors", "seconds"}`` (``n``: rows scored),
plus ``"bad_rows"`` and ``"repaired_rows"`` when there are any. With ``--out``, every input row is
written back with a ``reward`` field added (null where the reward does not apply).

Invalid text never stops the job: a line that is not UTF-8, not a JSON object, or has no completion
is a *bad row*: it is not scored, it is named on stderr, and with ``--out`` it is written as
``{"line": N, "error": "...", "reward": null}``. A row whose strings hold lone surrogates (a JSON
``\ud800`` escape) is scored as it is, and written back with each lone surrogate replaced by
U+FFFD (a *repaired row*), so the output is always valid UTF-8 JSON. Raw control characters
(NUL, TAB) inside JSON strings are accepted. Lines of any length are read (a 10 MB line is scored:
the math reward reads only the tail of a completion).

Departures from the papers: none (this is tooling).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

CONTEXT_FIELDS = ("prompt", "finish_reason", "num_tokens", "max_tokens")
_SURROGATE = re.compile("[\ud800-\udfff]")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score`` on an argparse subparsers object (``grpo/cli.py`` calls this)."""
    p = subparsers.add_parser("score", help="score a JSONL file of completions with one reward",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=lambda args: run(args))
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="JSONL file, one completion per line")
    p.add_argument("--reward", required=True, help="reward name: built-in, package.module:function or entry point")
    p.add_argument("--gold-field", default="answer", help="field holding the gold answer (default: answer)")
    p.add_argument("--completion-field", default="completion", help="field holding the completion (default: completion)")
    p.add_argument("--out", default=None, help="write every row back with a 'reward' field to this JSONL file")
    p.add_argument("--reward-kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    p.add_argument("--workers", type=int, default=2, help="sandbox worker processes (0: in-process, no deadline)")
    p.add_argument("--timeout-s", type=float, default=2.0, help="per-item wall-clock deadline in seconds")
    p.add_argument("--memory-mb", type=int, default=1024, help="per-worker address-space limit in MB")
    p.add_argument("--timeout-score", type=float, default=0.0, help="score of an item that runs past the deadline")
    p.add_argument("--error-score", type=float, default=0.0, help="score of an item whose reward raises")


def run(args: argparse.Namespace) -> int:
    from rewards import RewardSpec, Scorer, UnknownRewardError

    try:
        kwargs = json.loads(args.reward_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(f"grpo score: --reward-kwargs must be a JSON object ({e})", file=sys.stderr)
        return 2
    if args.out and not Path(args.out).resolve().parent.is_dir():  # before any scoring, not after it
        print(f"grpo score: --out {args.out}: the directory {Path(args.out).resolve().parent} does not exist",
              file=sys.stderr)
        return 2
    rows, bad = read_rows(args)
    completions = [str(row[args.completion_field]) for _, row in rows]
    examples, contexts = [], []
    for lineno, row in rows:
        example = {k: v for k, v in row.items() if k != args.completion_field}
        if args.gold_field in row:
            example["answer"] = row[args.gold_field]
        examples.append(example)
        ctx = {k: row[k] for k in CONTEXT_FIELDS if k in row}
        ctx["sample_id"] = _text(row.get("id", f"{args.file}:{lineno}"))
        contexts.append(ctx)
    try:
        scorer = Scorer([RewardSpec(args.reward, 1.0, kwargs)], workers=args.workers, timeout_s=args.timeout_s,
                        memory_mb=args.memory_mb, timeout_score=args.timeout_score, error_score=args.error_score)
    except UnknownRewardError as e:
        print(f"grpo score: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with scorer:
        res = scorer.score(completions, examples, contexts) if rows else None
    seconds = time.perf_counter() - t0
    values = res.per_function[args.reward] if res else []
    repaired = write_rows(args.out, rows, values, bad) if args.out else sum(_scrub(r)[1] for _, r in rows)
    applicable = [v for v in values if v is not None]
    summary = {
        "n": len(rows),
        "mean": (sum(applicable) / len(applicable)) if applicable else None,
        "timeouts": int(res.metrics[f"reward/{args.reward}/timeouts"]) if res else 0,
        "errors": int(res.metrics[f"reward/{args.reward}/errors"]) if res else 0,
        "seconds": round(seconds, 3),
    }
    if bad:
        summary["bad_rows"] = len(bad)
    if repaired:
        summary["repaired_rows"] = repaired
    print(json.dumps(summary))
    return 0


def read_rows(args) -> tuple[list[tuple[int, dict]], dict[int, str]]:
    """``(line number, row)`` of every valid row, and ``{line number: why}`` of every bad one."""
    rows, bad = [], {}
    with open(args.file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"), strict=False)  # strict=False: raw NUL/TAB in strings
            except UnicodeDecodeError as e:
                bad[lineno] = f"not UTF-8 (byte {e.start})"
                continue
            except (json.JSONDecodeError, RecursionError) as e:
                bad[lineno] = f"not JSON ({str(e)[:100]})"
                continue
            if not isinstance(row, dict):
                bad[lineno] = f"not a JSON object ({type(row).__name__})"
            elif args.completion_field not in row:
                bad[lineno] = f"no field {args.completion_field!r}"
            else:
                rows.append((lineno, row))
    for k, (lineno, why) in enumerate(sorted(bad.items())):
        if k == 20:
            print(f"grpo score: ... and {len(bad) - 20} more bad rows", file=sys.stderr)
            break
        print(f"grpo score: {args.file}:{lineno}: {why}: row not scored", file=sys.stderr)
    return rows, bad


def write_rows(path: str, rows, values, bad: dict[int, str]) -> int:
    """Every input row in input order, scored ones with ``reward``, bad ones marked; returns the
    number of rows whose text had to be repaired."""
    out = [(lineno, {**row, "reward": value}) for (lineno, row), value in zip(rows, values)]
    out += [(lineno, {"line": lineno, "error": why, "reward": None}) for lineno, why in bad.items()]
    repaired = 0
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")  # written whole, then renamed: never half a file
    with open(tmp, "w", encoding="utf-8") as f:
        for _, obj in sorted(out, key=lambda x: x[0]):
            clean, changed = _scrub(obj)
            repaired += changed
            f.write(json.dumps(clean, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return repaired


def _text(s) -> str:
    """A string with each lone surrogate replaced by U+FFFD (so it encodes as UTF-8)."""
    return _replace_surrogates(str(s))


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _scrub(obj):
    """``(obj with every string made valid UTF-8, whether anything changed)``."""
    if isinstance(obj, str):
        return (_replace_surrogates(obj), True) if _has_surrogate(obj) else (obj, False)
    if isinstance(obj, dict):
        items = [(_scrub(k), _scrub(v)) for k, v in obj.items()]
        return {k[0]: v[0] for k, v in items}, any(k[1] or v[1] for k, v in items)
    if isinstance(obj, list):
        items = [_scrub(v) for v in obj]
        return [v[0] for v in items], any(v[1] for v in items)
    return obj, False


def _replace_surrogates(s: str) -> str:
    return _SURROGATE.sub("\ufffd", s)


def main(argv: list[str] | None = None) -> int:
    """``python -m grpo.commands.score FILE --reward NAME ...`` (the same as ``grpo score``)."""
    parser = argparse.ArgumentParser(prog="grpo score", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
