"""The processes of a job: the Accelerator, FSDP2 on CPU, and what several processes cannot run yet.

Inside the job every rank draws the same global batch of `trainer.prompts_per_step` prompts and
keeps its contiguous slice (`grpo.collectives.rank_slice`), so a group never spans ranks. DDP and
FSDP2 average gradients over ranks, so the update divides the summed token losses by
`global tokens / world size`: the averaged gradient is then exactly the global-batch gradient.

FSDP2 on CPU: accelerate 1.15 falls back to DDP when `use_cpu` is set, so with an FSDP config on
CPU we apply `torch.distributed.fsdp.fully_shard` ourselves (per decoder layer, then the root);
gloo runs it. On GPUs accelerate's own FSDP2 plugin does the same.
"""

from __future__ import annotations

import os

import torch

from grpo.errors import UserError


class UnsupportedError(UserError):
    """A recipe setting that this process layout does not support."""


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

    inner = model.get_base_model() if hasattr(model, "peft_config") else model  # a LoRA run's peft model: its base
    for layer in inner.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def check_supported(cfg, world: int) -> None:
    """Combinations not supported under several processes fail at start-up, before any model loads.

    Dynamic sampling: ranks may need different numbers of generation rounds, so their prompt
    samplers would drift apart (breaking the shared global batch and resume); one process only.
    """
    if cfg.algorithm.dynamic_sampling and world > 1:
        raise UnsupportedError(
            f"algorithm.dynamic_sampling=true is not supported with {world} processes yet (ranks would draw "
            "different numbers of prompts); run it in one process, or set algorithm.dynamic_sampling=false")
    per_rank, parts, size = cfg.trainer.prompts_per_step // world, cfg.algorithm.mini_batches, cfg.rollout.group_size
    if world > 1 and per_rank >= parts and per_rank % parts:
        raise UnsupportedError(
            f"algorithm.mini_batches={parts} must divide each of the {world} processes' {per_rank} prompts "
            f"(trainer.prompts_per_step={cfg.trainer.prompts_per_step}): every process cuts its own groups into "
            "the same number of mini-batches")
    if world > 1 and per_rank < parts and size < parts:
        raise UnsupportedError(
            f"algorithm.mini_batches={parts} is more than each of the {world} processes' {per_rank} prompt(s) and "
            f"than rollout.group_size={size}: a process deals its groups' outputs over the mini-batches, so "
            f"lower algorithm.mini_batches to at most {max(per_rank, size)} or use fewer processes")
    tools = cfg.rollout.tools.environment
    if tools is not None and cfg.moe.routing_replay == "R3":
        raise UnsupportedError(
            f"rollout.tools.environment={tools!r} with moe.routing_replay=R3: multi-turn rollouts record no routed "
            "experts (environment tokens are fed, not sampled); use moe.routing_replay=R2 or none")
    if tools is not None and cfg.rollout.engine == "vllm" and cfg.rollout.vllm.mode == "server":
        raise UnsupportedError(
            f"rollout.tools.environment={tools!r} needs rollout.engine=hf or colocated vLLM (rollout.vllm.mode="
            "colocate): the server client does not run multi-turn rollouts yet")
    if cfg.trainer.max_staleness and world > 1:
        raise UnsupportedError(
            f"trainer.max_staleness={cfg.trainer.max_staleness} (asynchronous RL) is not supported with {world} "
            "processes yet: one trainer process feeds one generation side. Run it in one process (with "
            "rollout.vllm.mode=server on GPUs), or set trainer.max_staleness=0")
