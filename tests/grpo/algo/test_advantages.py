"""Hand-computed advantages (grpo/algo/advantages.py): group std, batch std, none, RLOO; zero-variance
fraction; DAPO's soft overlong penalty."""

from __future__ import annotations

import pytest
import torch

from grpo.algo.advantages import EPS, group_advantages, overlong_penalty, zero_variance_fraction

# group 0 has signal, group 1 has none
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-9)


def test_group_std():
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350; 0.5 / (0.577350 + 1e-4) = 0.865875
    a = 0.5 / ((1 / 3) ** 0.5 + EPS)
    close(group_advantages(REWARDS, "group"), [[a, -a, -a, a], [0.0] * 4])


def test_batch_std():
    # all 8 rewards: mean 1.25; squared deviations 0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 * 0.5625 = 5.5;
    # sample std sqrt(5.5 / 7) = 0.886405; group 0: 0.5 / (0.886405 + 1e-4) = 0.564013
    a = 0.5 / ((5.5 / 7) ** 0.5 + EPS)
    close(group_advantages(REWARDS, "batch"), [[a, -a, -a, a], [0.0] * 4])
    assert a == pytest.approx(0.564013, abs=1e-6)


def test_no_std_dr_grpo():
    close(group_advantages(REWARDS, "none"), [[0.5, -0.5, -0.5, 0.5], [0.0] * 4])  # r - 0.5


def test_rloo_leave_one_out():
    # r = 1: baseline mean(0, 0, 1) = 1/3 -> 2/3; r = 0: baseline mean(1, 0, 1) = 2/3 -> -2/3
    close(group_advantages(REWARDS, "rloo"), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4])


def test_groups_never_mix():
    # changing group 1 leaves group 0's advantages unchanged (group-wise scales)
    other = REWARDS.clone()
    other[1] = torch.tensor([5.0, -3.0, 0.0, 9.0])
    for scale in ("group", "none", "rloo"):
        close(group_advantages(other, scale)[0], group_advantages(REWARDS, scale)[0].tolist())


def test_zero_variance_fraction():
    assert zero_variance_fraction(REWARDS) == 0.5  # group 1 of 2
    assert zero_variance_fraction(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])) == pytest.approx(2 / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(REWARDS, "median")


def test_overlong_penalty():
    # L_max 20, L_cache 4: free up to 16 tokens; 18 -> (16 - 18) / 4 = -0.5; 20 -> -1; 25 -> -1 (clamped)
    close(overlong_penalty(torch.tensor([3, 16, 17, 18, 20, 25]), 20, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    close(overlong_penalty(torch.tensor([20]), 20, 0), [0.0])  # buffer 0 disables it
    # L_max = 20, buffer 8: no penalty up to 12 tokens, linear to -1 at 20, -1 beyond (the cases of the
    # reward route this replaced, rewards.countdown:overlong_penalty)
    close(overlong_penalty(torch.tensor([10, 12, 16, 20, 25]), 20, 8), [0.0, 0.0, -0.5, -1.0, -1.0])


def test_loop_adds_the_soft_overlong_penalty_before_advantages():
    from grpo.algo.advantages import assign_advantages
    from grpo.config import RunConfig
    from rollout.base import Rollout

    # max_new_tokens 10, buffer 0.2 -> L_cache 2: lengths [4, 9, 10, 10] get penalties [0, -0.5, -1, -1]
    # rewards [1, 1, 1, 0] + penalties = [1, 0.5, 0, -1]; scale none: mean 0.125 -> [0.875, 0.375, -0.125, -1.125]
    cfg = RunConfig.model_validate({"rollout": {"group_size": 4, "max_new_tokens": 10},
                                    "algorithm": {"advantage_scale": "none", "overlong_buffer": 0.2}})
    rollouts = [Rollout(group=0, prompt_ids=(1,), completion_ids=(2,) * n, text="", logprobs=(0.0,) * n,
                        finish_reason="stop", reward=r) for n, r in zip([4, 9, 10, 10], [1.0, 1.0, 1.0, 0.0])]
    out, metrics = assign_advantages(rollouts, cfg.algorithm, 4, 10)
    assert [r.advantage for r in out] == pytest.approx([0.875, 0.375, -0.125, -1.125])
    assert [r.rewards["overlong_penalty"] for r in out] == [0.0, -0.5, -1.0, -1.0]
    assert metrics["reward/overlong_penalty"] == pytest.approx(-2.5 / 4)
    plain, _ = assign_advantages(rollouts, cfg.algorithm.model_copy(update={"overlong_buffer": 0.0}), 4, 10)
    assert [r.advantage for r in plain] == pytest.approx([0.25, 0.25, 0.25, -0.75])  # r - 0.75
