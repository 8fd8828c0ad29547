"""The `grpo` command line.

    grpo train RECIPE [key=value ...] [--output-dir DIR]
    grpo score FILE.jsonl --reward NAME [--out RESULTS.jsonl]
    grpo dashboard RUNS_DIR [--host 127.0.0.1] [--port 8050] [--export report.html]

Recipe problems (unknown key, wrong type, missing file, malformed YAML) print one line naming the
file and the dotted key, exit with status 2, and write nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"grpo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_train(args: argparse.Namespace) -> int:
    from grpo.config import ConfigError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if output_dir.exists() and any(output_dir.iterdir()):
        return _fail(f"{output_dir}: output directory is not empty (choose another --output-dir)")

    from grpo.train import train
    from rewards import UnknownRewardError

    try:
        summary = train(cfg, output_dir)
    except UnknownRewardError as exc:
        return _fail(f"{args.recipe}: rewards.functions: {exc}")
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        print(f"held-out greedy accuracy (correct answer in the required format): "
              f"before RL {before['accuracy']:.3f}, after RL {after['accuracy']:.3f} "
              f"({after['num_prompts']} prompts)")
    fmt = summary["train"]["format_reward_last"]
    if fmt is not None:
        print(f"format reward over the last 10% of steps: {fmt:.3f}")
    print(f"run directory: {output_dir}  ({summary['train']['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="R1-Zero-style RL for language models (GRPO and relatives).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="train a policy from a recipe",
                             description="Train a policy with the recipe RECIPE; key=value pairs override recipe fields.")
    train.add_argument("recipe", metavar="RECIPE", help="path of a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. trainer.steps=50")
    train.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<recipe>-<time>)")
    train.set_defaults(func=cmd_train)

    from grpo import dashboard, score

    score.add_parser(verbs)
    dashboard.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
