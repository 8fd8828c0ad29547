"""Where reward names become functions: built-in short names, `module:function`, entry points.

A reward is a plain function ``(completion: str, example: dict, **context) -> float | None``
(sync or ``async``); ``None`` means "does not apply to this sample". A recipe names rewards with
`RewardSpec`; every name is resolved once, at start-up, in this order:

1. a built-in short name (`BUILTIN_REWARDS`),
2. ``package.module:function`` (imported with importlib),
3. an entry point in the group ``grpo_zero.rewards`` (importlib.metadata).

An unknown name raises `UnknownRewardError` listing every name it knows, before any model loads.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ENTRY_POINT_GROUP = "grpo_zero.rewards"

# short name -> "module:function"; the functions live in this package.
BUILTIN_REWARDS: dict[str, str] = {
    "math_answer": "rewards.math:math_answer",
    "format": "rewards.format:format_reward",
    "format_partial": "rewards.format:format_partial",
    "countdown": "rewards.countdown:countdown",
    "think_steps": "rewards.thinking:think_steps",
    "reasoning_gym": "rewards.reasoning_gym:reasoning_gym_reward",
    "environment": "rewards.environment:environment_reward",
}

# names that are no longer rewards: where the setting lives now (the error says so)
MOVED: dict[str, str] = {
    "overlong_penalty": "DAPO's soft overlong penalty is the recipe field algorithm.overlong_buffer (a share of "
    "rollout.max_new_tokens, e.g. 0.2), added to the total reward before the advantages",
}

RewardFn = Callable[..., Any]


class UnknownPluginError(ValueError):
    """A plugin name (reward, environment) that is neither built in, nor an importable
    `module:function`, nor an entry point of its group."""


class UnknownRewardError(UnknownPluginError):
    """A reward name that is neither built in, nor an importable `module:function`, nor an entry point."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a recipe: which function, its weight in the total, and keyword options."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __hash__(self) -> int:  # kwargs is a dict; hash on what identifies the reward
        return hash((self.name, self.weight))


def _entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def known_reward_names() -> list[str]:
    """Built-in short names plus installed entry-point names (``module:function`` always works too)."""
    return sorted(set(BUILTIN_REWARDS) | set(_entry_points()))


def _import_target(target: str) -> RewardFn:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{target} is not callable")
    return fn


IMPORT_TIMEOUT_S = 60.0  # a plugin module that takes longer to import is reported, not waited on


def _import_bounded(name: str, load: Callable[[], RewardFn], error: type[UnknownPluginError] = UnknownRewardError,
                    kind: str = "reward") -> RewardFn:
    """`load()` (a plugin's import) on a helper thread, given IMPORT_TIMEOUT_S: a module that hangs
    when imported (waiting on a socket, a lock, input) is an error naming it instead of a silent hang."""
    result: dict = {}

    def work() -> None:
        try:
            result["fn"] = load()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            result["error"] = e

    thread = threading.Thread(target=work, name=f"import {kind} {name}", daemon=True)
    thread.start()
    thread.join(IMPORT_TIMEOUT_S)
    if thread.is_alive():
        raise error(f"{kind} {name!r}: importing it took over {IMPORT_TIMEOUT_S:g} s (does its module "
                                 "wait on something when it is imported?)")
    if "error" in result:
        raise result["error"]
    return result["fn"]


@functools.cache
def resolve(name: str) -> RewardFn:
    """The function a reward name stands for; raises `UnknownRewardError` if there is none.

    >>> resolve("format").__name__
    'format_reward'
    >>> resolve("rewards.math:math_answer") is resolve("math_answer")
    True
    """
    return resolve_plugin(name, BUILTIN_REWARDS, ENTRY_POINT_GROUP, kind="reward", error=UnknownRewardError,
                          moved=MOVED)


def resolve_plugin(name: str, builtins: dict[str, str], group: str, *, kind: str,
                   error: type[UnknownPluginError] = UnknownPluginError, moved: dict[str, str] | None = None):
    """What a plugin name stands for, in the order rewards resolve (a built-in short name of
    `builtins`, then `package.module:function`, then an entry point of `group`); `kind` names the
    plugin in errors ("reward", "environment"). Raises `error` listing the names it knows."""
    known = ", ".join(sorted(set(builtins) | set(_entry_points(group))))
    if name in builtins:
        return _import_target(builtins[name])
    if ":" in name:
        try:
            return _import_bounded(name, lambda: _import_target(name), error, kind)
        except UnknownPluginError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a plugin raises while it is imported
            raise error(
                f"{kind} {name!r} could not be imported ({type(e).__name__}: {e}); "
                f"known names: {known}, or any 'package.module:function'"
            ) from None
    eps = _entry_points(group)
    if name in eps:
        try:
            fn = _import_bounded(name, eps[name].load, error, kind)
        except UnknownPluginError:
            raise
        except Exception as e:  # noqa: BLE001
            raise error(f"entry point {name!r} ({eps[name].value}) could not be loaded "
                        f"({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise error(f"entry point {name!r} ({eps[name].value}) is not callable")
        return fn
    if moved and name in moved:
        raise error(f"{kind} {name!r} is not a {kind} any more: {moved[name]}")
    raise error(
        f"unknown {kind} {name!r}; known names: {known}, "
        f"or any 'package.module:function', or an entry point in group {group!r}"
    )
