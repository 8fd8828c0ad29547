"""Checkpoints that a run killed at any moment resumes from to the same result.

Layout (`OUTPUT_DIR/checkpoints/step-NNNNNN/`):
- `model/`        the policy and tokenizer (`save_pretrained`; loads with `from_pretrained`)
- `optimizer.pt`  optimizer state (a full, unsharded state dict, also under FSDP2)
- `scheduler.pt`  learning-rate scheduler state
- `rng-rank{r}.pt` Python, NumPy, torch CPU (and CUDA) RNG states of every rank
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

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.distributed import gather_objects

STATE_FILE = "state.json"


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


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (None if there is none)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`auto` -> latest checkpoint in output_dir (None if none yet); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


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
         keep_last: int, is_main: bool, extra: dict[str, object] | None = None) -> Path | None:
    """Write a checkpoint atomically (a collective: call on every rank). Returns its path on rank 0.
    `extra`: more objects, each `torch.save`d to its file name inside the checkpoint."""
    rngs = gather_objects(_rng_state())
    # Replicated (DDP) parameters must be bit-identical on every rank: record each rank's digest.
    digests = gather_objects(None if _sharded(model) else parameter_digest(model))
    weights = full_model_state(model)
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
        payload = {**state.__dict__, "world_size": len(rngs), "parameter_digests": digests}
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> TrainState:
    raw = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    raw.pop("world_size", None)
    raw.pop("parameter_digests", None)
    return TrainState(**raw)


def restore(path: Path, *, model, optimizer, scheduler, rank: int) -> None:
    """Optimizer, scheduler and this rank's RNG states (the model loads from `path/model`)."""
    path = Path(path)
    _load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():  # a run resumed on more ranks than it was saved from re-seeds the rest
        _set_rng_state(torch.load(rng_file, weights_only=False))


def trim_metrics(output_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (by the run that died) from metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
