"""Runs the doctests of every rewards module, so `pytest tests/` covers them."""

import doctest
import importlib

import pytest

MODULES = ["rewards.registry", "rewards.run", "rewards.scorer", "rewards.mathparse", "rewards.math",
           "rewards.math.extract", "rewards.math.normalize", "rewards.math.parser", "rewards.math.compare",
           "rewards.math.numbers", "rewards.math.choice", "rewards.math.fallback", "rewards.math.reward",
           "rewards.format", "rewards.countdown", "rewards.reasoning_gym"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_every_builtin_reward_has_a_doctest():
    from rewards.registry import BUILTIN_REWARDS, resolve

    for name in BUILTIN_REWARDS:
        fn = resolve(name)
        assert fn.__doc__ and ">>>" in fn.__doc__, f"built-in reward {name} has no doctest"
