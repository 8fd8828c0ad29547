"""Where a vLLM engine runs and what its requests are seeded with, outside vLLM itself.

Tensor-parallel groups of consecutive ranks and the gathering of a group's prompts, per-request
seeds, the environment vLLM's external launcher reads, and the guards that keep the trainer's
process state (global RNGs, thread count, default process group) as it was while vLLM starts and
shuts down.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "tp_groups",
    "flatten_gathered",
    "request_seeds",
    "prompt_request_seeds",
    "set_launcher_env",
    "process_state_kept",
    "default_group_kept",
]


# ---------------------------------------------------------------------------------------------
# Tensor-parallel groups, request splitting and request seeds
# ---------------------------------------------------------------------------------------------


def tp_groups(world_size: int, tp: int) -> list[list[int]]:
    """Consecutive ranks form a tensor-parallel group, as vLLM's external launcher assumes.

    >>> tp_groups(4, 2)
    [[0, 1], [2, 3]]
    """
    if tp < 1 or world_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the world size {world_size}")
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world_size // tp)]


def flatten_gathered(per_rank: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
    """Concatenate the prompt lists gathered from the ranks of a TP group.

    Returns the flat list and the offsets: rank r of the group owns items
    `offsets[r]:offsets[r + 1]`. Ranks may hold different numbers of prompts.

    >>> flatten_gathered([["a", "b"], [], ["c"]])
    (['a', 'b', 'c'], [0, 2, 2, 3])
    """
    flat: list[Any] = []
    offsets = [0]
    for items in per_rank:
        flat.extend(items)
        offsets.append(len(flat))
    return flat, offsets


def request_seeds(base: int, num_requests: int, n: int) -> list[int]:
    """Per-request seeds that keep all `num_requests * n` completions on distinct seeds.

    vLLM gives the j-th of a request's `n` completions the seed `seed + j`
    (`ParentRequest._get_child_sampling_params` in `vllm/v1/engine/parallel_sampling.py`), so
    request k starts at `base + k * n`.

    >>> request_seeds(100, 3, 4)
    [100, 104, 108]
    """
    return [base + k * n for k in range(num_requests)]


def prompt_request_seeds(prompt_seeds: Sequence[int], num_requests: int) -> list[int]:
    """Per-request vLLM seeds from the trainer's per-prompt seeds (`SamplingParams.prompt_seeds`).

    Request i samples with seed `prompt_seeds[i]` (its j-th completion with `seed + j`, vLLM's rule),
    so what a prompt samples depends on its own seed only, not on the batch it was sent in: one
    process and N processes sample the same rollouts.

    >>> prompt_request_seeds([7, 1000], 2)
    [7, 1000]
    """
    if len(prompt_seeds) != num_requests:
        raise ValueError(f"{len(prompt_seeds)} prompt seeds for {num_requests} prompts")
    return [int(s) % 2**63 for s in prompt_seeds]


# ---------------------------------------------------------------------------------------------
# Launcher environment and the trainer's process state
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_launcher_env(rank: int, local_rank: int, world_size: int) -> None:
    """The variables vLLM's external launcher reads to join (or create) torch.distributed."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


@contextlib.contextmanager
def process_state_kept():
    """Undo what starting vLLM in-process does to the trainer's process.

    vLLM's workers reseed Python's, NumPy's and torch's global generators (`set_random_seed`), and the
    CPU worker replaces `torch.set_num_threads` with a no-op for the rest of the process
    (`cpu_worker.py`); both are put back when the block ends.
    """
    import numpy as np

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def default_group_kept(keep: bool):
    """While vLLM shuts down, keep the default torch.distributed group (when `keep`: it belongs to
    the trainer). vLLM's shutdown destroys every group it knows, the default one included
    (`destroy_distributed_environment`); its own subgroups are still destroyed."""
    if not keep:
        yield
        return
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy
