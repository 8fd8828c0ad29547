"""Checkpoints that a run killed at any moment resumes from to the same result.

Layout (`OUTPUT_DIR/checkpoints/step-NNNNNN/`):
- `model/`        the policy and tokenizer (`save_pretrained`; loads with `from_pretrained`); a LoRA
                  run's holds the adapter in PEFT's format instead (the base is the recipe's model)
- `optimizer.pt`  optimizer state (a full, unsharded state dict, also under FSDP2; LoRA: the adapter's)
- `scheduler.pt`  learning-rate scheduler state
- `rng-rank{r}.pt` Python, NumPy, torch CPU (and CUDA) RNG states of every rank
- `reference.pt`  the reference policy's weights, once `algorithm.ref_refresh_steps` has replaced
                  it with the policy (before that it is the recipe's model, reloaded from there)
- `state.json`    step, prompt-sampler epoch/position, tracker run ids, skip counters, world size
                  and every rank's parameter digest (sha256; equal on all ranks under DDP)

Writing is atomic: rank 0 writes a hidden temporary directory next to the final one, fsyncs
every file and the directory, then renames it into place; only then are old checkpoints beyond
`trainer.keep_checkpoints` deleted. A write that fails half-way (disk full, read-only target,
SIGKILL) leaves at most a `.tmp-*` directory that `latest()` ignores, so the previous checkpoint
stays the one resumed from.

Resume: `grpo train RECIPE --output-dir DIR --resume auto` picks the newest complete checkpoint
in DIR; `--resume PATH` names one. Every rank reads the checkpoint (on several machines DIR must
be on a shared filesystem). The metrics logged after the checkpoint's step by the killed run are
dropped from `metrics.jsonl`, so the resumed run appends the steps again once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.collectives import gather_objects
from grpo.errors import UserError, out_of_space

STATE_FILE = "state.json"
REFERENCE_FILE = "reference.pt"
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's own state besides model/optimizer/scheduler."""

    step: int = 0
    sampler_epoch: int = 0
    sampler_position: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0
    tracker_ids: dict | None = None


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


class ResumeError(UserError):
    """A checkpoint that cannot be resumed as asked (damaged, or from a different run set-up)."""


def _complete(root: Path) -> list[Path]:
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (None if there is none)."""
    root = checkpoint_dir(output_dir)
    return next(iter(_complete(root)), None) if root.is_dir() else None


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None: intact). Checks that its state file
    parses and that every file it lists has the size it was written with (a checkpoint from before
    file lists were recorded is trusted as it is)."""
    try:
        raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    for name, size in (raw.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`auto` -> the newest intact checkpoint in output_dir (None if none yet; a damaged newer one
    is reported and passed over); a path -> that checkpoint, which must be intact. Temporary
    directories that a killed save left behind are removed."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ResumeError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
        problem = damage(path)
        if problem:
            raise ResumeError(f"{path}: damaged checkpoint: {problem}")
        return path
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    passed_over = False
    for path in _complete(root):
        problem = damage(path)
        if problem is None:
            if passed_over:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        log.warning("checkpoint %s is damaged (%s); passing over it to an older one", path, problem)
        passed_over = True
    return None


# --- what a resumed run must share with the run it continues -----------------------------------

# Fields a resumed run may change freely: how long it runs, how it is checkpointed, logged and
# evaluated, and how fast (threads, engine memory, reward sandbox sizing). Anything else changes the
# experiment under the checkpoint's weights and needs `--allow-change KEY`.
SAFE_TO_CHANGE = (
    "trainer.steps", "trainer.save_every", "trainer.keep_checkpoints", "trainer.threads",
    "trainer.generation_threads", "trainer.max_consecutive_skips", "trainer.stall_warn_s", "trainer.stall_stop_s",
    "logging.", "eval.", "launch.",
    "rewards.workers", "rewards.timeout_s", "rewards.memory_mb", "rewards.fail_fast", "rewards.max_failing_steps",
    "rollout.vllm.",
    "rollout.hf.", "model.attn_implementation", "model.experts_implementation",
)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _allowed(key: str, allow: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) or key.startswith(a + ".") for a in allow)


def check_resume(path: Path, config: dict, allow: tuple[str, ...] = ()) -> None:
    """Refuse to resume `path` under a recipe that changed what the checkpoint's weights were
    trained with (naming every changed key), or with fewer steps than it already took."""
    raw = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    if config["trainer"]["steps"] < raw["step"]:
        raise ResumeError(f"{path}: trainer.steps={config['trainer']['steps']} is below the checkpoint's step "
                          f"{raw['step']}; resume with trainer.steps of at least {raw['step']}")
    saved = raw.get("config")
    if saved is None:  # written before checkpoints recorded their recipe
        return
    now, before = flatten(config), flatten(saved)
    changed = [k for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)
               and not _allowed(k, SAFE_TO_CHANGE + tuple(allow))]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ResumeError(f"{path}: the recipe differs from the one this checkpoint was trained with: {shown}{more}. "
                          f"Resume with the checkpoint's values, or accept a change with --allow-change KEY")


# --- state of the pieces -------------------------------------------------------------------------


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 DTensor parameters


def full_model_state(model: torch.nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded model state (a collective under FSDP2: call it on every rank). Under FSDP2
    only rank 0 receives it (on CPU) unless `every_rank`."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return get_model_state_dict(model, options=options)
    model = getattr(model, "module", model)  # DDP wrapper: its module's names
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def policy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint and final/ hold of the policy: a LoRA run's adapter (`save_pretrained`
    then writes it in PEFT's format), else the full unsharded state (`full_model_state`)."""
    inner = getattr(model, "module", model)  # DDP wrapper: its module
    if hasattr(inner, "peft_config"):  # a peft model: its adapter's parameters, under the peft model's names
        return lora_state(model)
    return full_model_state(model)


def lora_state(model: torch.nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """A peft model's adapter tensors, unsharded, on the CPU, as private copies (a collective
    under FSDP2, where only rank 0 receives them unless `every_rank`)."""
    if _sharded(model):
        return {k: v for k, v in full_model_state(model, every_rank=every_rank).items() if "lora_" in k}
    inner = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if "lora_" in k}


def _optimizer_state(model, optimizer) -> dict:
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optimizer_state(model, optimizer, state: dict) -> None:
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- save / load -----------------------------------------------------------------------------------


def save(output_dir: Path, state: TrainState, *, model, unwrapped, tokenizer, optimizer, scheduler,
         keep_last: int, is_main: bool, extra: dict[str, object] | None = None,
         config: dict | None = None) -> Path | None:
    """Write a checkpoint atomically (a collective: call on every rank). Returns its path on rank 0.
    `extra`: more objects, each `torch.save`d to its file name inside the checkpoint. `config`: the
    recipe (as a dict) that `check_resume` compares a resumed run's with. The state file lists every
    file with its size, so that `damage` can tell a truncated checkpoint from an intact one."""
    rngs = gather_objects(_rng_state())
    # Replicated (DDP) parameters must be bit-identical on every rank: record each rank's digest.
    digests = gather_objects(None if _sharded(model) else parameter_digest(model))
    weights = policy_state(model)
    optim_state = _optimizer_state(model, optimizer)
    if not is_main:
        return None
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        unwrapped.save_pretrained(tmp / "model", state_dict=weights)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rngs):
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        payload = {**state.__dict__, "world_size": len(rngs), "parameter_digests": digests, "files": files,
                   "config": config}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of the same step from a run that died after writing it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and out_of_space(exc, root):
            raise OSError(errno.ENOSPC, f"no space left while writing checkpoint {final.name}", str(root)) from exc
        raise
    done = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a full disk leaves the previous version, or none)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_final(output_dir: Path, unwrapped, tokenizer, weights: dict[str, torch.Tensor]) -> Path:
    """The trained model and its tokenizer in OUTPUT_DIR/final, written whole or not at all (a LoRA
    run's: the adapter in PEFT's format, `PeftModel.from_pretrained(base, final)`; `grpo merge-lora`
    writes base + adapter as a plain model)."""
    final = output_dir / "final"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=output_dir))
    try:
        unwrapped.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and out_of_space(exc, output_dir):
            raise OSError(errno.ENOSPC, "no space left while writing the final model", str(final)) from exc
        raise
    return final


def load_state(path: Path) -> TrainState:
    raw = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    for key in ("world_size", "parameter_digests", "files", "config"):
        raw.pop(key, None)
    return TrainState(**raw)


def restore(path: Path, *, model, optimizer, scheduler, rank: int) -> None:
    """Optimizer, scheduler and this rank's RNG states (the model loads from `path/model`)."""
    path = Path(path)
    _load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():  # a run resumed on more ranks than it was saved from re-seeds the rest
        _set_rng_state(torch.load(rng_file, weights_only=False))


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain (unsharded, unwrapped) module's state on the CPU, e.g. the reference policy's."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def restore_reference(path: Path, ref_model: torch.nn.Module | None) -> None:
    """The reference policy as the checkpoint's run had it: its saved weights when a refresh had
    replaced it (`REFERENCE_FILE`); otherwise it stays the recipe's model."""
    file = Path(path) / REFERENCE_FILE
    if ref_model is not None and file.is_file():
        ref_model.load_state_dict(torch.load(file, weights_only=True))


def trim_metrics(output_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (by the run that died) from metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in kept))
