"""Processes: launching through accelerate, splitting the batch, all-reducing global quantities.

Launch (what `grpo train RECIPE --accelerate-config NAME|PATH` runs, and what you can run by hand):

    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m grpo train RECIPE ...

`NAME` is a file of `recipes/accelerate/` without `.yaml`. On CPU the configs say
`distributed_type: MULTI_GPU` with `use_cpu: true`: accelerate then starts its processes with
torchrun and the Accelerator runs as `MULTI_CPU` over gloo. (A `MULTI_CPU` config makes
`accelerate launch` go through MPI and, without `mpirun`, it started one process only.)

Inside the job every rank:
- draws the same global batch of `trainer.prompts_per_step` prompts (so the prompt sampler's
  position is the same everywhere) and keeps its contiguous slice: a group never spans ranks;
- samples each group with a seed derived from (recipe seed, step, global prompt index), so the
  rollouts do not depend on how many ranks there are;
- all-reduces the loss normaliser (tokens of the global batch), the metrics and the expert loads.

DDP and FSDP2 average gradients over ranks, so the update divides the summed token losses by
`global tokens / world size`: the averaged gradient is then exactly the global-batch gradient.

FSDP2 on CPU: accelerate 1.15 falls back to DDP when `use_cpu` is set, so with an FSDP config on
CPU we apply `torch.distributed.fsdp.fully_shard` ourselves (per decoder layer, then the root);
gloo runs it. On GPUs accelerate's own FSDP2 plugin does the same.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


# --- launching -----------------------------------------------------------------------------------


def resolve_accelerate_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = ACCELERATE_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"accelerate config {name_or_path!r}: not a file, nor one of {known}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: Path, train_args: list[str], *, num_machines: int | None = None,
                   machine_rank: int | None = None, main_process_ip: str | None = None,
                   main_process_port: int | None = None) -> list[str]:
    """`accelerate launch --config_file CONFIG [overrides] -m grpo train ARGS`."""
    import yaml

    conf = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    machines = num_machines or conf.get("num_machines", 1)
    if num_machines is not None:
        # accelerate reads num_processes as the total over machines
        per_machine = conf.get("num_processes", 1) // max(1, conf.get("num_machines", 1))
        cmd += ["--num_machines", str(num_machines), "--num_processes", str(per_machine * num_machines)]
    if machine_rank is not None:
        cmd += ["--machine_rank", str(machine_rank)]
    if main_process_ip is not None:
        cmd += ["--main_process_ip", main_process_ip]
    port = main_process_port or conf.get("main_process_port")
    if port is None and machines == 1:
        port = free_port()  # never collide with another job on this machine
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "grpo", "train", *train_args]


def launched_processes(config: Path, num_machines: int | None = None) -> int:
    """Processes in the whole job that `launch_command` starts for this config."""
    import yaml

    conf = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    total = conf.get("num_processes", 1)
    if num_machines is not None:
        total = total // max(1, conf.get("num_machines", 1)) * num_machines
    return max(1, total)


def launch(config: Path, train_args: list[str], **overrides) -> int:
    cmd = launch_command(config, train_args, **overrides)
    env = {**os.environ, "GRPO_ZERO_LAUNCHED": "1"}
    return subprocess.call(cmd, env=env)


# --- inside the job --------------------------------------------------------------------------


def make_accelerator(seed: int):
    """The Accelerator (CPU when there is no GPU), plus per-rank seeds derived from `seed`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # MoE: an expert no token of this rank picked gets no gradient; DDP must not wait for it.
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=kwargs)
    torch.manual_seed(seed * 1_000 + accelerator.process_index)
    accelerator.wait_for_everyone()  # every rank has passed its start-up checks before rank 0 writes
    return accelerator


def fsdp_on_cpu(accelerator) -> bool:
    """An FSDP config on a CPU machine: accelerate would fall back to DDP, we shard ourselves."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.device.type == "cpu"
            and accelerator.num_processes > 1)


def fully_shard_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over gloo: shard every decoder layer, then the root module."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


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


def check_supported(cfg, world: int) -> None:
    """Combinations not supported under several processes fail at start-up, before any model loads.

    Dynamic sampling: ranks may need different numbers of generation rounds, so their prompt
    samplers would drift apart (breaking the shared global batch and resume); one process only.
    """
    if cfg.algorithm.dynamic_sampling and world > 1:
        raise UnsupportedError(
            f"algorithm.dynamic_sampling=true is not supported with {world} processes yet (ranks would draw "
            "different numbers of prompts); run it in one process, or set algorithm.dynamic_sampling=false")
    if cfg.trainer.max_staleness and world > 1:
        raise UnsupportedError(
            f"trainer.max_staleness={cfg.trainer.max_staleness} (asynchronous RL) is not supported with {world} "
            "processes yet: one trainer process feeds one generation side. Run it in one process (with "
            "rollout.vllm.mode=server on GPUs), or set trainer.max_staleness=0")


class UnsupportedError(ValueError):
    """A recipe setting that this process layout does not support."""


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
    dist.all_reduce(t)
    return t.item()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.to(_device(), torch.float64).clone()
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
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
