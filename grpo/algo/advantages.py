"""Group-relative advantages (GRPO 2402.03300; Dr. GRPO 2503.20783; RLOO 2402.14740) and DAPO's soft
overlong punishment (2503.14476, eq. 13).

Rewards arrive as a `[num_prompts, group_size]` tensor: row i holds the rewards of the G
completions of prompt i. A group's baseline never mixes with another group's.

    group: A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)          (GRPO)
    batch: A_ij = (r_ij - mean_j r_ij) / (std over all P*G rewards + eps)
    none:  A_ij =  r_ij - mean_j r_ij                                 (Dr. GRPO: no std scaling)
    rloo:  A_ij =  r_ij - mean_{k != j} r_ik = G/(G-1) (r_ij - mean_j r_ij)   (leave-one-out baseline)

`std` is the sample standard deviation (Bessel-corrected, as in the GRPO reference implementations).

`assign_advantages` is what one training step calls: it builds that tensor from the step's scored
rollouts (gathered from every rank), adds the overlong penalty and hands each rollout its advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from grpo.collectives import gather_objects, rank
from grpo.config import AlgorithmConfig
from rollout.base import Rollout

EPS = 1e-4


def _group_std(rewards: torch.Tensor, centred: torch.Tensor, eps: float) -> torch.Tensor:
    return centred / (rewards.std(dim=1, keepdim=True) + eps)  # [P, G]


def _batch_std(rewards: torch.Tensor, centred: torch.Tensor, eps: float) -> torch.Tensor:
    return centred / (rewards.std() + eps)  # [P, G]; one std over the whole batch


def _no_scale(rewards: torch.Tensor, centred: torch.Tensor, eps: float) -> torch.Tensor:
    return centred  # [P, G]


def _leave_one_out(rewards: torch.Tensor, centred: torch.Tensor, eps: float) -> torch.Tensor:
    G = rewards.shape[1]
    return centred * G / (G - 1)  # [P, G]; r_j - (sum_k r_k - r_j) / (G - 1)


SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": _group_std, "batch": _batch_std, "none": _no_scale, "rloo": _leave_one_out,
}


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = EPS) -> torch.Tensor:
    """Advantages for a `[num_prompts, group_size]` reward tensor; same shape out.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale="none")
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, group_size >= 2], got {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; known: {', '.join(SCALES)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    return SCALES[scale](rewards, centred, eps)  # [P, G]


def zero_variance_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose G rewards are all equal (they carry no learning signal)."""
    return (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean().item()


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer_tokens: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (2503.14476, eq. 13), added to the reward; same shape out.

        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
        -1                                  if |y| > L_max

    with L_max = max_tokens and L_cache = buffer_tokens.

    >>> overlong_penalty(torch.tensor([10, 14, 16]), max_tokens=16, buffer_tokens=4)
    tensor([ 0.0000, -0.5000, -1.0000])
    """
    if buffer_tokens <= 0:
        return torch.zeros(lengths.shape)
    free = max_tokens - buffer_tokens
    return ((free - lengths.float()) / buffer_tokens).clamp(min=-1.0, max=0.0)  # same shape as lengths


def assign_advantages(rollouts: list[Rollout], algorithm: AlgorithmConfig, group_size: int,
                      max_tokens: int) -> tuple[list[Rollout], dict[str, float]]:
    """Group advantages of the total reward plus DAPO's soft overlong penalty (when enabled; it is
    then added to each rollout's total and recorded under rewards["overlong_penalty"]).

    Computed on the global [P, G] reward tensor (gathered from every rank), so any scaling,
    batch-level std included, is the same as in one process; this rank keeps its rows."""
    lengths = torch.tensor([r.num_completion_tokens for r in rollouts])  # [P/W*G]
    penalty = overlong_penalty(lengths, max_tokens, round(algorithm.overlong_buffer * max_tokens))  # [P/W*G]
    local = (torch.tensor([r.reward for r in rollouts], dtype=torch.float32) + penalty).view(-1, group_size)  # [P/W, G]
    shares = gather_objects((local, penalty))
    rewards = torch.cat([s[0] for s in shares])  # [P, G]
    start = sum(len(s[0]) for s in shares[: rank() if len(shares) > 1 else 0])
    adv = group_advantages(rewards, scale=algorithm.advantage_scale)[start : start + len(local)].flatten().tolist()
    metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
               "reward/overlong_penalty": torch.cat([s[1] for s in shares]).mean().item(),
               "train/zero_variance_groups": zero_variance_fraction(rewards)}
    if algorithm.overlong_buffer == 0:
        return [replace(r, advantage=a) for r, a in zip(rollouts, adv)], metrics
    return [replace(r, reward=float(t), advantage=a, rewards={**r.rewards, "overlong_penalty": float(p)})
            for r, t, a, p in zip(rollouts, local.flatten().tolist(), adv, penalty.tolist())], metrics
