"""Every shipped recipe loads through the config tree and names only components that exist."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import rewards
from grpo.commands.plan import resolve_arch
from grpo.config import load_recipe
from grpo.data.prompts import CHAT, TEMPLATES, correct_rewards, template_fields
from grpo.data.tasks import SYNTHETIC_TASKS

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
HEADER_FIELDS = ("Hardware:", "Expected", "Data", "Aims at:")


def resolve_reward(name: str):
    """A built-in (or entry-point) name, else `package.module:function` through importlib."""
    if name in rewards.known_reward_names():
        return name
    module, sep, attr = name.partition(":")
    if not sep:
        raise AssertionError(f"unknown reward {name!r}; known: {rewards.known_reward_names()}")
    return getattr(importlib.import_module(module), attr)


def header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny-cpu.yaml", "qwen2.5-math-1.5b-zero.yaml", "qwen2.5-math-7b-zero.yaml", "qwen3-30b-a3b-zero.yaml",
            "deepseek-v2-lite-zero.yaml", "olmoe-1b-7b-zero.yaml", "countdown-tiny-cpu.yaml"} <= names
    assert any(n.startswith("countdown-") and n != "countdown-tiny-cpu.yaml" for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_resolves(path):
    cfg = load_recipe(path)
    for fn in cfg.rewards.functions:
        resolve_reward(fn.name)
    for name in correct_rewards(cfg.data, cfg.eval):
        resolve_reward(name)
    assert cfg.data.template in TEMPLATES or cfg.data.template == CHAT
    needed = template_fields(cfg.data.template)
    if cfg.data.source not in SYNTHETIC_TASKS:
        mapped = ({"question"} if cfg.data.prompt_field else set()) | set(cfg.data.extra_fields)
        assert needed <= mapped, f"template {cfg.data.template} needs {needed}, recipe maps {mapped}"
        for spec in cfg.eval.datasets:
            assert needed <= ({"question"} if spec.prompt_field else set()) | set(spec.extra_fields)
    assert cfg.eval.num_prompts > 0 or cfg.eval.datasets, "nothing to evaluate"
    arch = resolve_arch(cfg.model.name_or_path)  # the planner knows the model without a download
    assert arch.params()[0] > 0


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_header_states_what_it_is(path):
    lines = header(path)
    assert lines and lines[0], f"{path.name}: needs a one-line summary comment at the top"
    if path.name == "tiny-cpu.yaml":  # the format recipe, documented in the README
        return
    text = "\n".join(lines)
    for field in HEADER_FIELDS:
        assert field in text, f"{path.name}: header should state {field!r}"


def test_recipes_verb_lists_one_line_each():
    done = subprocess.run([sys.executable, "-m", "grpo", "recipes"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(RECIPES)
    for path, line in zip(RECIPES, lines):
        assert line.startswith(path.name) and header(path)[0] in line


def test_every_verb_has_help():
    for verb in ("train", "eval", "plan", "recipes", "score", "dashboard"):
        done = subprocess.run([sys.executable, "-m", "grpo", verb, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "usage: grpo " + verb in done.stdout
    top = subprocess.run([sys.executable, "-m", "grpo", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    for verb in ("train", "eval", "plan", "recipes", "score", "dashboard"):
        assert verb in top.stdout
