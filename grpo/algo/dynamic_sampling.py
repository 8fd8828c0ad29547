"""DAPO dynamic sampling (2503.14476, section 3.2): keep only groups whose rewards differ.

A group whose G rewards are all equal has zero advantage everywhere, so it adds nothing to the
gradient but still dilutes a token-mean loss. Dynamic sampling drops such groups and draws fresh
prompts until the batch holds `num_prompts` informative groups, with a bound on generation rounds.

Departures from the paper, on purpose: the filter looks at the total reward (every reward
function, weighted), not only accuracy; when the bound is hit the step trains on the informative
groups found so far (a smaller batch), and on the first round's groups if there were none; the
reward metrics returned are those of the first round, an unfiltered sample of the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from rollout.base import Rollout

T = TypeVar("T")  # what a group is drawn as: a data row, or the step's PromptGroup record


def informative_groups(rollouts: list[Rollout]) -> list[int]:
    """Group ids (in order of appearance) whose rewards are not all equal."""
    rewards: dict[int, list[float]] = {}
    for r in rollouts:
        rewards.setdefault(r.group, []).append(r.reward)
    return [g for g, values in rewards.items() if max(values) > min(values)]


def sample_batch(
    generate_and_score: Callable[[list[T]], tuple[list[Rollout], dict[str, float]]],
    next_rows: Callable[[int], list[T]],
    num_prompts: int,
    *,
    dynamic: bool,
    max_attempts: int,
) -> tuple[list[T], list[Rollout], dict[str, float]]:
    """Draw prompts and roll them out; with `dynamic`, keep drawing until `num_prompts` groups have
    reward variance (at most `max_attempts` rounds).

    generate_and_score(rows) -> (scored rollouts with `group` indexing `rows`, reward metrics)
    next_rows(n) -> the next n data rows
    Returns the rows of the kept groups, their rollouts (prompt-major, `group` renumbered to index
    the returned rows) and the reward metrics of the first round plus sampling metrics.
    """
    rows = next_rows(num_prompts)
    rollouts, metrics = generate_and_score(rows)
    if not dynamic:
        return rows, rollouts, metrics
    kept_rows: list[T] = []
    kept: list[Rollout] = []
    attempts, drawn = 1, num_prompts
    first_rows, first_rollouts = rows, rollouts
    while True:
        for g in informative_groups(rollouts)[: num_prompts - len(kept_rows)]:
            kept.extend(replace(r, group=len(kept_rows)) for r in rollouts if r.group == g)
            kept_rows.append(rows[g])
        if len(kept_rows) >= num_prompts or attempts >= max_attempts:
            break
        rows = next_rows(num_prompts - len(kept_rows))
        rollouts, _ = generate_and_score(rows)
        attempts += 1
        drawn += len(rows)
    metrics = {**metrics, "rollout/sampling_attempts": float(attempts),
               "rollout/kept_group_frac": len(kept_rows) / drawn, "rollout/batch_fill": len(kept_rows) / num_prompts}
    if not kept_rows:  # nothing informative: the first round's groups (their gradient is zero)
        return first_rows, first_rollouts, metrics
    return kept_rows, kept, metrics
