"""Rewards for R1-Zero-style RL: math answers, format, countdown, worked steps, plugins.

Untrusted model text is never evaluated as code; with ``workers >= 1`` every reward runs in a
sandboxed worker process with a per-item deadline and a memory limit (`rewards.sandbox`).
"""

from rewards.registry import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    RewardSpec,
    UnknownRewardError,
    known_reward_names,
    resolve,
)
from rewards.scorer import RewardError, Scorer, ScoreResult, is_correct

__all__ = [
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "RewardError",
    "RewardSpec",
    "ScoreResult",
    "Scorer",
    "UnknownRewardError",
    "is_correct",
    "known_reward_names",
    "resolve",
]
