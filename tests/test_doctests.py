"""Runs the doctests of every `grpo` and `rollout` module that has any (the rewards package has its
own list, tests/rewards/test_rewards_doctests.py), so an example in a docstring cannot drift."""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.conftest import ROOT

MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for pkg in ("grpo", "rollout")
                 for p in (ROOT / pkg).rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def test_the_modules_with_examples_are_found():
    assert "grpo.model.optim" in MODULES and "grpo.algo.advantages" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} doctest(s) failed in {name}"
