"""`grpo merge-lora ADAPTER OUT`: a LoRA run's adapter merged into its base, saved as a plain model.

CPU or GPU machine (the merge runs on the CPU, in the base's dtype):
    grpo merge-lora runs/x OUT                 # runs/x/final (a run directory names its final adapter)
    grpo merge-lora runs/x/checkpoints/step-000100/model OUT --base Qwen/Qwen2.5-Math-7B
OUT then loads with `AutoModelForCausalLM.from_pretrained(OUT)` and in vLLM as an ordinary model.

ADAPTER is any directory in PEFT's format (adapter_config.json): a LoRA run's `final/`, a
checkpoint's `model/`, or the run directory itself (its `final/`). The base is `--base` (a Hub id, a
directory or `builtin:NAME`), else the one the adapter names (`base_model_name_or_path`). The
merge is peft's `merge_and_unload`: W + (alpha / r) B A in every adapted layer.

Departures from the papers: none (this is tooling).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``merge-lora`` on an argparse subparsers object (``grpo/cli.py`` calls this)."""
    p = subparsers.add_parser("merge-lora", help="merge a LoRA run's adapter into its base and save a plain model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", metavar="ADAPTER", help="a run directory, its final/, or a checkpoint's model/")
    p.add_argument("out", metavar="OUT", help="directory to write the merged model and tokenizer to")
    p.add_argument("--base", metavar="MODEL", help="base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=run)
    return p


def adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter directory `path` names (a run directory stands for its final/)."""
    from grpo.model.lora import is_adapter_dir

    path = Path(path)
    for candidate in (path, path / "final"):
        if is_adapter_dir(candidate):
            return candidate
    raise UserError(f"{path}: no LoRA adapter here (no adapter_config.json in it or in its final/)")


def run(args: argparse.Namespace) -> int:
    import torch

    from grpo.config import ModelConfig
    from grpo.model.loading import load_policy
    from grpo.model.lora import adapter_base, merge_to_directory

    adapter = adapter_dir(args.adapter)
    base = args.base or adapter_base(adapter)
    if not base:
        raise UserError(f"{adapter}: the adapter names no base model; give one with --base")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new directory")
    model, tokenizer = load_policy(ModelConfig(name_or_path=base), torch.device("cpu"), progress=True)
    written = merge_to_directory(model, adapter, tokenizer, out)
    print(f"merged {adapter} into {base}: {written}", file=sys.stderr)
    return 0
