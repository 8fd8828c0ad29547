"""Loading what a run trains: the policy and its tokenizer, and the frozen reference. `grpo train`,
`grpo eval` and the asynchronous generation process all load models through here."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from grpo.config import ModelConfig, RunConfig
from grpo.errors import UserError, first_line
from grpo.hub import hub_reachable
from grpo.model.experts import experts_implementation


class ModelError(UserError):
    """The model cannot be loaded, phrased for a person: `name: what is wrong (what to do)`."""


def check_model_source(name: str, revision: str | None = None) -> None:
    """Fail at once, with a line that says why, where loading `name` could only fail slowly or
    with a library traceback: a local path that does not exist or holds no config.json, or a Hub
    id that is not cached while the Hub cannot be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name}: not a model directory (no config.json)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists():
        raise ModelError(f"{name}: no such model directory")
    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if not hub_reachable():
        raise ModelError(f"{name}: not a local directory and not in the Hub cache ({constants.HF_HUB_CACHE}), and "
                         f"{constants.ENDPOINT} could not be reached (no network?); download it where there is "
                         f"network (hf download {name}) or give a local path")


def _load(what: str, name: str, load):
    """`load()`, with what the libraries raise for a broken model directory or Hub id turned into
    a ModelError naming it (the original stays chained for --verbose)."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{name}: the {what} could not be loaded: {first_line(exc)}") from exc


def load_policy(model: ModelConfig, device: torch.device, path: str | Path | None = None, progress: bool = True):
    """The policy and its tokenizer: a built-in tiny base (built and cached on first use, with a
    progress bar if `progress`), a Hub id or a local directory; `path` (a checkpoint's model)
    replaces the recipe's model. A model that cannot be loaded is a `ModelError` naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.model.tiny import BUILTIN_PREFIX, ensure_tiny_base

    name = str(path) if path is not None else model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        name = str(ensure_tiny_base(name[len(BUILTIN_PREFIX) :], progress=progress))
    revision = model.revision if path is None else None
    check_model_source(name, revision)
    kwargs = {"dtype": getattr(torch, model.dtype), "trust_remote_code": model.trust_remote_code}
    if model.revision and path is None:
        kwargs["revision"] = model.revision
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    experts = experts_implementation(model.experts_implementation, device)
    if experts:
        kwargs["experts_implementation"] = experts
    tokenizer = _load("tokenizer", name, lambda: AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=model.trust_remote_code))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = _load("model", name, lambda: AutoModelForCausalLM.from_pretrained(name, **kwargs)).to(device)
    return policy, tokenizer


def reference_model(cfg: RunConfig, model, device: torch.device, resumed: bool):
    """The frozen initial policy for the KL term (beta > 0 only; None otherwise). A resumed run
    reloads the recipe's model: the checkpoint holds the trained policy, not the reference."""
    if cfg.algorithm.beta <= 0:
        return None
    ref = load_policy(cfg.model, device, progress=cfg.logging.progress)[0] if resumed else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)
