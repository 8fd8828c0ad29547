"""In-job collectives: the rank, the world size, sums and means over processes, and the seeds and
batch shares that make a step the same whatever the number of processes.
Each collective is the watchdog's phase "collective" (grpo/phases.py): a rank stuck in one waits for another.

Every rank draws the same global batch of prompts and keeps its contiguous slice (`rank_slice`);
each group samples with a seed derived from (recipe seed, step, global prompt index) (`group_seed`),
so rollouts do not depend on how many ranks there are; the loss normaliser, the metrics and the
expert loads are all-reduced. In a single process every function returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grpo.phases import phase


def rank_slice(total: int, rank: int, world: int) -> slice:
    """The contiguous share of `total` items that `rank` handles; `total` must divide evenly."""
    if total % world:
        raise ValueError(f"trainer.prompts_per_step={total} must be a multiple of the {world} processes")
    per = total // world
    return slice(rank * per, (rank + 1) * per)


def group_seed(seed: int, step: int, prompt_index: int, round_index: int = 0) -> int:
    """Sampling seed of one group: the same whichever rank samples it. `round_index` > 0 numbers
    the extra generation rounds of dynamic sampling (round 0 keeps the plain seed)."""
    base = (seed * 1_000_003 + step) * 100_003 + prompt_index
    return base if round_index == 0 else base * 1_009 + round_index


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(value: float) -> float:
    """Sum of a Python number over processes (the number itself in a single process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    with phase("collective"):
        dist.all_reduce(t)
    return t.item()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.to(_device(), torch.float64).clone()
    with phase("collective"):
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out.cpu()


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean over processes (max for `*_max` keys); every rank gets the same dictionary."""
    world = world_size()
    if world == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    is_max = torch.tensor([k.endswith("_max") for k in keys])
    summed = all_reduce_tensor(values) / world
    maxed = all_reduce_tensor(values, op="max")
    return {k: float(maxed[i] if is_max[i] else summed[i]) for i, k in enumerate(keys)}


def broadcast_object(obj):
    if world_size() == 1:
        return obj
    box = [obj]
    with phase("collective"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    with phase("collective"):
        dist.all_gather_object(out, obj)
    return out


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
