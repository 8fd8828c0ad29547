import pytest

from rewards import RewardSpec, Scorer, UnknownRewardError, known_reward_names, resolve


def test_builtin_names_resolve():
    for name in ["math_answer", "format", "format_partial", "countdown", "think_steps"]:
        assert name in known_reward_names()
        assert callable(resolve(name))


def test_a_name_that_moved_says_where():
    """The soft overlong penalty has one route, algorithm.overlong_buffer; its old reward name says so."""
    with pytest.raises(UnknownRewardError, match="algorithm.overlong_buffer"):
        resolve("overlong_penalty")


def test_module_function_resolves():
    assert resolve("rewards.format:format_reward") is resolve("format")


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownRewardError) as e:
        Scorer([RewardSpec("no_such_reward")], workers=0)
    assert "math_answer" in str(e.value) and "no_such_reward" in str(e.value)
    with pytest.raises(UnknownRewardError):
        resolve("no.such.module:fn")


def test_weighted_total_and_metrics_inline():
    with Scorer([RewardSpec("math_answer", 1.0), RewardSpec("format", 0.5)], workers=0) as s:
        r = s.score(
            ["<think>3+4 is 7</think><answer>7</answer>", "<think>x</think><answer>8</answer>", "7"],
            [{"answer": "7"}] * 3,
        )
    # 1*1 + 0.5*1 ; 1*0 + 0.5*1 ; 1*0 (no answer tag -> whole text "7" ... is a bare answer) + 0
    assert r.per_function["format"] == [1.0, 1.0, 0.0]
    assert r.total[:2] == [1.5, 0.5]
    assert r.metrics["reward/format"] == pytest.approx(2 / 3)
    assert r.metrics["reward/math_answer/errors"] == 0.0
