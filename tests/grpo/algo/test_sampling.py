"""DAPO dynamic sampling (grpo/algo/dynamic_sampling.py). `generate_and_score` is the callable the loop passes in;
here it is a plain function that gives each prompt row fixed rewards, so the expected batch can be
written down by hand."""

from __future__ import annotations

from grpo.algo.dynamic_sampling import informative_groups, sample_batch
from rollout.base import Rollout

G = 2


def source(rows_rewards: list[list[float]]):
    """next_rows draws rows 0, 1, 2, ... in order; row k's G completions get rewards rows_rewards[k]."""
    drawn = {"next": 0, "rounds": 0}

    def next_rows(n: int) -> list[dict]:
        rows = [{"id": drawn["next"] + i} for i in range(n)]
        drawn["next"] += n
        return rows

    def generate_and_score(rows: list[dict]):
        drawn["rounds"] += 1
        rollouts = [Rollout(group=g, prompt_ids=(row["id"],), completion_ids=(j,), text="", logprobs=(0.0,),
                            finish_reason="stop", reward=rows_rewards[row["id"]][j])
                    for g, row in enumerate(rows) for j in range(G)]
        return rollouts, {"reward/mean": sum(r.reward for r in rollouts) / len(rollouts)}

    return next_rows, generate_and_score, drawn


def test_informative_groups():
    next_rows, gen, _ = source([[1, 1], [0, 1], [0, 0]])
    rollouts, _ = gen(next_rows(3))
    assert informative_groups(rollouts) == [1]


def test_dynamic_sampling_fills_the_batch():
    # round 1 draws rows 0-2: only row 1 differs -> keep 1, need 2 more
    # round 2 draws rows 3-4: row 4 differs -> keep, need 1 more
    # round 3 draws row 5: differs -> batch full after 3 rounds, 6 rows drawn
    rewards = [[1, 1], [0, 1], [0, 0], [1, 1], [1, 0], [0.5, 0]]
    next_rows, gen, drawn = source(rewards)
    rows, rollouts, metrics = sample_batch(gen, next_rows, 3, dynamic=True, max_attempts=5)
    assert [r["id"] for r in rows] == [1, 4, 5]
    assert [r.group for r in rollouts] == [0, 0, 1, 1, 2, 2]  # renumbered to index the returned rows
    assert [r.prompt_ids[0] for r in rollouts] == [1, 1, 4, 4, 5, 5]
    assert drawn["rounds"] == 3
    assert metrics["rollout/sampling_attempts"] == 3.0
    assert metrics["rollout/kept_group_frac"] == 3 / 6
    assert metrics["reward/mean"] == (2 + 1 + 0) / 6  # the first round's rewards: 3 / 6 = 0.5


def test_attempts_are_bounded():
    # only row 0 ever differs; 2 rounds at most: rows 0-2, then rows 3-4 -> a batch of 1 group
    rewards = [[0, 1]] + [[0, 0]] * 10
    next_rows, gen, drawn = source(rewards)
    rows, rollouts, metrics = sample_batch(gen, next_rows, 3, dynamic=True, max_attempts=2)
    assert [r["id"] for r in rows] == [0] and len(rollouts) == G
    assert drawn["rounds"] == 2 and metrics["rollout/batch_fill"] == 1 / 3


def test_no_informative_group_trains_on_the_first_round():
    next_rows, gen, drawn = source([[0, 0]] * 10)
    rows, rollouts, _ = sample_batch(gen, next_rows, 2, dynamic=True, max_attempts=3)
    assert [r["id"] for r in rows] == [0, 1] and drawn["rounds"] == 3


def test_without_dynamic_sampling_one_round():
    next_rows, gen, drawn = source([[0, 0], [1, 1]])
    rows, rollouts, metrics = sample_batch(gen, next_rows, 2, dynamic=False, max_attempts=4)
    assert [r["id"] for r in rows] == [0, 1] and len(rollouts) == 4 and drawn["rounds"] == 1
    assert "rollout/sampling_attempts" not in metrics
