"""Loading what a run trains: the policy and its tokenizer, the frozen reference, the optimizer and
its learning-rate schedule. `grpo train` and `grpo eval` both load models through here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from grpo.config import RunConfig, TrainerConfig
from grpo.errors import first_line
from grpo.experts import experts_implementation
from grpo.hub import hub_reachable


class ModelError(ValueError):
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


def load_policy(cfg: RunConfig, device: torch.device, path: str | Path | None = None):
    """The policy and its tokenizer: a built-in tiny base (built and cached on first use), a Hub
    id or a local directory; `path` (a checkpoint's model) replaces the recipe's model. A model
    that cannot be loaded is a `ModelError` naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.tiny import BUILTIN_PREFIX, ensure_tiny_base

    name = str(path) if path is not None else cfg.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        name = str(ensure_tiny_base(name[len(BUILTIN_PREFIX) :], progress=cfg.logging.progress))
    revision = cfg.model.revision if path is None else None
    check_model_source(name, revision)
    kwargs = {"dtype": getattr(torch, cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision and path is None:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    experts = experts_implementation(cfg.model.experts_implementation, device)
    if experts:
        kwargs["experts_implementation"] = experts
    tokenizer = _load("tokenizer", name, lambda: AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=cfg.model.trust_remote_code))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load("model", name, lambda: AutoModelForCausalLM.from_pretrained(name, **kwargs)).to(device)
    return model, tokenizer


def reference_model(cfg: RunConfig, model, device: torch.device, resumed: bool):
    """The frozen initial policy for the KL term (beta > 0 only; None otherwise). A resumed run
    reloads the recipe's model: the checkpoint holds the trained policy, not the reference."""
    if cfg.algorithm.beta <= 0:
        return None
    ref = load_policy(cfg, device)[0] if resumed else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def make_optimizer(model, tr: TrainerConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the model's parameters; the fused kernel (one pass over all parameters) where
    torch has one for their device and dtype, unless `fused` is False (sharded DTensor params)."""
    params = list(model.parameters())
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay, fused=fused or None)


def lr_factor(step: int, tr: TrainerConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of `trainer.lr`.

    Linear warm-up over `warmup_steps` ((s + 1) / (warmup_steps + 1)), then, for `lr_schedule`
    "constant", 1; for "linear" and "cosine", a decay from 1 at the end of the warm-up towards
    `min_lr_ratio`, reached one step after the last (as transformers' schedules do, so the last
    step still learns), with progress t = (s - warmup_steps) / (steps - warmup_steps):

        linear: min + (1 - min) * (1 - t)
        cosine: min + (1 - min) * (1 + cos(pi * t)) / 2

    A pure function of the step, so a resumed run follows the same schedule.

    >>> from grpo.config import TrainerConfig
    >>> tr = TrainerConfig(steps=5, warmup_steps=1, lr_schedule="linear")
    >>> [round(lr_factor(s, tr), 3) for s in range(5)]
    [0.5, 1.0, 0.75, 0.5, 0.25]
    >>> [round(lr_factor(s, tr.model_copy(update={"lr_schedule": "cosine", "min_lr_ratio": 0.1})), 3) for s in range(5)]
    [0.5, 1.0, 0.868, 0.55, 0.232]
    """
    if step < tr.warmup_steps:
        return (step + 1) / (tr.warmup_steps + 1)
    if tr.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps))
    shape = 1.0 - t if tr.lr_schedule == "linear" else (1.0 + math.cos(math.pi * t)) / 2
    return tr.min_lr_ratio + (1.0 - tr.min_lr_ratio) * shape


def make_schedule(optimizer: torch.optim.Optimizer, tr: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`trainer.lr` times `lr_factor` at each step (warm-up, then constant or decayed)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tr))
