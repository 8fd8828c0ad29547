"""Group-relative advantages (GRPO 2402.03300; Dr. GRPO 2503.20783).

Rewards arrive as a `[num_prompts, group_size]` tensor: row i holds the rewards of the G
completions of prompt i. A group's statistics never mix with another group's.

    group: A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)          (GRPO)
    none:  A_ij =  r_ij - mean_j r_ij                                 (Dr. GRPO: no std scaling)

`std` is the sample standard deviation over the group (Bessel-corrected, as in the GRPO
reference implementations).
"""

from __future__ import annotations

import torch

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = EPS) -> torch.Tensor:
    """Advantages for a `[num_prompts, group_size]` reward tensor; same shape out.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale="none")
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, group_size >= 2], got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)  # [P, G]
    raise ValueError(f"unknown advantage scale {scale!r}; known: group, none")


def zero_variance_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose G rewards are all equal (they carry no learning signal)."""
    return (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean().item()
