"""The `grpo` command line.

    grpo train RECIPE [key=value ...] [--output-dir DIR] [--resume auto|PATH]
               [--accelerate-config NAME|PATH [--num_machines N --machine_rank R --main_process_ip IP
                                               --main_process_port PORT]]
    grpo score FILE.jsonl --reward NAME [--out RESULTS.jsonl]
    grpo dashboard RUNS_DIR [--host 127.0.0.1] [--port 8050] [--export report.html]

Recipe problems (unknown key, wrong type, missing file, malformed YAML) print one line naming the
file and the dotted key, exit with status 2, and write nothing. A run stopped by repeated
non-finite losses exits with status 3.

`--accelerate-config` re-runs this command under `accelerate launch` with that config (a file of
recipes/accelerate/ by name, or a path); the launcher flags override the config's, e.g. for a
2-machine job run on machine R:
    grpo train RECIPE --output-dir DIR --accelerate-config multi-node-cpu \
        --num_machines 2 --machine_rank R --main_process_ip 10.0.0.1 --main_process_port 29500
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_NONFINITE = 3


def _fail(message: str) -> int:
    print(f"grpo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_train(args: argparse.Namespace) -> int:
    from grpo.config import ConfigError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.resume == "auto" and not args.output_dir:
        return _fail("--resume auto needs --output-dir (the run directory to resume)")
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.resume and output_dir.exists() and any(output_dir.iterdir()):
        return _fail(f"{output_dir}: output directory is not empty (choose another --output-dir, or --resume auto)")
    if args.resume and args.resume != "auto" and not (Path(args.resume) / "state.json").is_file():
        return _fail(f"--resume {args.resume}: not a checkpoint directory (no state.json)")

    if args.accelerate_config:
        from grpo.distributed import launch, resolve_accelerate_config

        try:
            config = resolve_accelerate_config(args.accelerate_config)
        except FileNotFoundError as exc:
            return _fail(str(exc))
        rest = [args.recipe, *args.overrides, "--output-dir", str(output_dir)]
        if args.resume:
            rest += ["--resume", args.resume]
        return launch(config, rest, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      main_process_ip=args.main_process_ip, main_process_port=args.main_process_port)

    from grpo.train import NonFiniteError, train
    from rewards import UnknownRewardError

    try:
        summary = train(cfg, output_dir, resume=args.resume)
    except UnknownRewardError as exc:
        return _fail(f"{args.recipe}: rewards.functions: {exc}")
    except NonFiniteError as exc:
        print(f"grpo: stopped: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    if "train" not in summary:  # not the main process: rank 0 reports
        return 0
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
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from a checkpoint: auto = the newest in --output-dir (none yet: start), or a path")
    launch = train.add_argument_group("launching (accelerate)")
    launch.add_argument("--accelerate-config", metavar="NAME|PATH",
                        help="run under `accelerate launch` with recipes/accelerate/NAME.yaml or a config file")
    launch.add_argument("--num_machines", type=int, help="machines in the job (overrides the config)")
    launch.add_argument("--machine_rank", type=int, help="rank of this machine, 0 .. num_machines-1")
    launch.add_argument("--main_process_ip", help="address of machine 0")
    launch.add_argument("--main_process_port", type=int, help="port on machine 0 for the rendezvous")
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
