"""`grpo sandbox FILE`: run one Python program in the python tool's sandbox and print what the
policy would see (the output tags and their content) and the call's status.

CPU (any Linux machine with bubblewrap; `make setup` installs it):
    grpo sandbox program.py [--recipe RECIPE] [key=value ...]
GPU cluster: the same command (the sandbox never uses the GPU).

The sandbox's limits and markers come from the recipe's `rollout.tools` section (the defaults
without --recipe). The last line on stdout is one JSON object: {"status", "exit_code", "seconds"}.

Departures from the papers: none (this is tooling).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sandbox`` on an argparse subparsers object (``grpo/cli.py`` calls this)."""
    p = subparsers.add_parser("sandbox", help="run one program in the python tool's sandbox, show what the policy sees",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a Python source file")
    p.add_argument("--recipe", default=None, help="take rollout.tools (limits, markers) from this recipe")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. rollout.tools.sandbox.timeout_s=2")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from grpo.config import apply_overrides, load_recipe, parse_recipe_dict
    from grpo.errors import UserError
    from rollout.tools.python_env import PythonTool

    path = Path(args.file)
    try:
        code = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    if args.recipe:
        cfg = load_recipe(args.recipe, args.overrides)
    else:  # the defaults, with the overrides
        cfg = parse_recipe_dict(apply_overrides({}, args.overrides), "command line")
    tools = cfg.rollout.tools.model_copy(update={"environment": "python"})
    from grpo.run.tools import make_environment

    env = make_environment(tools)
    try:
        assert isinstance(env, PythonTool)
        result = env.sandbox.run(code)
        print(env.render(result.output, result.status))
    finally:
        env.close()
    print(json.dumps({"status": result.status, "exit_code": result.exit_code, "seconds": round(result.seconds, 3)}))
    sys.stdout.flush()
    return 0
