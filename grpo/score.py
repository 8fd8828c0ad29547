"""`grpo score`: score a JSONL file of completions offline with one reward, in the sandbox.

CPU (any machine):
    grpo score completions.jsonl --reward math_answer [--gold-field answer]
        [--completion-field completion] [--out results.jsonl] [--workers 2] [--timeout-s 2]
GPU cluster: the same command; rewards run on CPUs only.

Each input line is a JSON object holding a completion (``--completion-field``) and the example
fields the reward reads (the gold answer under ``--gold-field``, passed to the reward as
``answer``; countdown rows carry ``target`` and ``numbers``; an optional ``prompt`` goes into the
context, as do ``finish_reason``, ``num_tokens`` and ``max_tokens`` if present). The last line on
stdout is one JSON object: ``{"n", "mean", "timeouts", "errors", "seconds"}``. With ``--out``,
every input row is written back with a ``reward`` field added (null where the reward does not
apply).

Departures from the papers: none (this is tooling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CONTEXT_FIELDS = ("prompt", "finish_reason", "num_tokens", "max_tokens")


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
    rows, completions, examples, contexts = [], [], [], []
    with open(args.file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"grpo score: {args.file}:{lineno}: not JSON ({e})", file=sys.stderr)
                return 2
            if args.completion_field not in row:
                print(f"grpo score: {args.file}:{lineno}: no field {args.completion_field!r}", file=sys.stderr)
                return 2
            rows.append(row)
            completions.append(str(row[args.completion_field]))
            example = {k: v for k, v in row.items() if k != args.completion_field}
            if args.gold_field in row:
                example["answer"] = row[args.gold_field]
            examples.append(example)
            ctx = {k: row[k] for k in CONTEXT_FIELDS if k in row}
            ctx["sample_id"] = str(row.get("id", f"{args.file}:{lineno}"))
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
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for row, value in zip(rows, values):
                f.write(json.dumps({**row, "reward": value}, ensure_ascii=False) + "\n")
    applicable = [v for v in values if v is not None]
    summary = {
        "n": len(rows),
        "mean": (sum(applicable) / len(applicable)) if applicable else None,
        "timeouts": int(res.metrics[f"reward/{args.reward}/timeouts"]) if res else 0,
        "errors": int(res.metrics[f"reward/{args.reward}/errors"]) if res else 0,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m grpo.score FILE --reward NAME ...`` (the same as ``grpo score``)."""
    parser = argparse.ArgumentParser(prog="grpo score", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
