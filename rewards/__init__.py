"""Rewards for R1-Zero-style RL: math answers, format, countdown, worked steps, plugins.

Untrusted model text is never evaluated as code; with ``workers >= 1`` every reward runs in a
sandboxed worker process with a per-item deadline and a memory limit (`rewards.sandbox`).

The package, in the order a completion travels:

- `rewards.registry`: reward names (built-in, ``module:function``, entry point) -> functions, once;
- `rewards.scorer`: `Scorer` runs every reward on every completion and weighs them (`ScoreResult`),
  and `is_correct`, the one definition of a correct completion;
- `rewards.sandbox`: the worker processes (deadline, memory limit, kill and replace);
- `rewards.run`: one reward on one item, with the one exception policy;
- the rewards: `rewards.format` (the R1 tags, and `answer_block`, the one reader of the answer
  block), `rewards.math` (the math answer checker, its own package), `rewards.countdown`,
  `rewards.thinking` (what the thinking block holds), `rewards.reasoning_gym` (a reasoning-gym
  task's own checker, for the tasks whose checker never evaluates model text).

May import: only its own modules (nothing in `grpo` or `rollout`).
"""

from rewards.registry import (
    BUILTIN_REWARDS,
    ENTRY_POINT_GROUP,
    RewardSpec,
    UnknownRewardError,
    known_reward_names,
    resolve,
)
from rewards.run import Scored
from rewards.scorer import RewardError, Scorer, ScoreResult, is_correct

__all__ = [
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "RewardError",
    "RewardSpec",
    "ScoreResult",
    "Scored",
    "Scorer",
    "UnknownRewardError",
    "is_correct",
    "known_reward_names",
    "resolve",
]
