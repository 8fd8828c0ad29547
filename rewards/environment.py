"""The reward a multi-turn rollout's environment gave (`rollout.turns`): for environments that
score the episode themselves (games, OpenEnv environments, `rollout.tools.openenv_env`)."""

from __future__ import annotations


def environment_reward(completion: str, example: dict | None = None, env_reward: float | None = None,
                       default: float = 0.0, **context) -> float:
    """The sum of the rewards the environment returned over the rollout's turns, or `default` when it
    returned none (a one-turn rollout, or an episode the environment never scored).

    >>> environment_reward("...", {}, env_reward=1.5)
    1.5
    >>> environment_reward("...", {}), environment_reward("...", {}, env_reward=None, default=-1.0)
    (0.0, -1.0)
    """
    return float(env_reward) if env_reward is not None else float(default)
