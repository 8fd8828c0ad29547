"""The optimizer of a run and its learning-rate schedule (warm-up, then constant, linear or cosine)."""

from __future__ import annotations

import math

import torch

from grpo.config import TrainerConfig

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def make_optimizer(model, tr: TrainerConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (all of them, or a LoRA run's adapters); the
    fused kernel (one pass over all parameters) where torch has one for their device and dtype,
    unless `fused` is False (sharded DTensor params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay, fused=fused or None)


def lr_factor(step: int, tr: TrainerConfig, per_batch: int = 1) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of `trainer.lr`.

    `trainer.steps` and `trainer.warmup_steps` count steps (generation batches); the schedule
    counts optimizer steps, `per_batch` of them per step (`algorithm.mini_batches` x
    `num_iterations`, `grpo.algo.update.optimizer_steps_per_batch`). Below, `steps` and
    `warmup_steps` are the trainer's times `per_batch`, so a warm-up of W steps lasts W x per_batch
    optimizer steps and the decay reaches its end one optimizer step after the run's last.

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
    warmup, steps = tr.warmup_steps * per_batch, tr.steps * per_batch
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if tr.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    shape = 1.0 - t if tr.lr_schedule == "linear" else (1.0 + math.cos(math.pi * t)) / 2
    return tr.min_lr_ratio + (1.0 - tr.min_lr_ratio) * shape


def make_schedule(optimizer: torch.optim.Optimizer, tr: TrainerConfig,
                  per_batch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """`trainer.lr` times `lr_factor` at each optimizer step (warm-up, then constant or decayed);
    `per_batch` optimizer steps per trainer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tr, per_batch))
