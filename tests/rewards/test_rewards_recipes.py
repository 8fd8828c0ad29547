"""Every reward named in a recipe under recipes/ resolves (names fail before a model loads)."""


import pytest
import yaml

from rewards import resolve
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _reward_names(cfg) -> list[str]:
    rewards = (cfg or {}).get("rewards") if isinstance(cfg, dict) else None
    if not isinstance(rewards, dict):
        return []
    return [f["name"] if isinstance(f, dict) else str(f) for f in rewards.get("functions", [])]


@pytest.mark.parametrize("path", [p for p in RECIPES if _reward_names(yaml.safe_load(p.read_text()))] or [None])
def test_recipe_reward_names_resolve(path):
    if path is None:
        pytest.skip("no recipe under recipes/ names rewards yet")
    for name in _reward_names(yaml.safe_load(path.read_text())):
        assert callable(resolve(name)), f"{path}: {name}"
