"""The shape the code keeps: no function over 80 lines in the packages, and no import back up the
layers (docs/architecture.md): `rewards/` and `rollout/` never import `grpo` (`rollout/` not
`rewards` either), nothing below the run imports the trainer or the command line, and the modules of
`rollout/` import one another without circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "rollout", "rewards")
MAX_LINES = 80


def _files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named parts:\n" + "\n".join(long)


@pytest.mark.parametrize("package", ["rewards", "rollout"])
def test_lower_layers_never_import_grpo(package):
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _files(package) for m in _imports(p) if m.split(".")[0] == "grpo"]
    assert not bad, bad


def test_rollout_never_imports_rewards():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _files("rollout") for m in _imports(p) if m.split(".")[0] == "rewards"]
    assert not bad, bad


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_rollout_modules_import_without_circles():
    """Counts every import of one `rollout/` module by another, at the top or inside a function."""
    modules = {_module(p): p for p in _files("rollout")}
    edges = {name: sorted(m for m in _imports(path) if m in modules and m != name) for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def circle_from(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in edges[name]:
            if state.get(dep) == "open":
                return [*path[path.index(dep):], dep]  # the open modules are `path`
            if dep not in state and (found := circle_from(dep, [*path, dep])):
                return found
        state[name] = "done"
        return None

    for name in sorted(modules):
        if name not in state:
            found = circle_from(name, [name])
            assert found is None, " -> ".join(found)


def test_nothing_below_the_run_imports_the_trainer_or_the_cli():
    upper = {"grpo.train", "grpo.cli", "grpo.toy"}
    allowed = {"train.py", "cli.py", "toy.py", "__main__.py"}
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _files("grpo") if p.name not in allowed and p.parent.name == "grpo"
           for m in _imports(p) if m in upper]
    assert not bad, bad
