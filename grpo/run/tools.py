"""The environment of multi-turn rollouts, from the recipe's `rollout.tools` section.

Environment names resolve like reward names (`rewards.registry.resolve_plugin`): a built-in short
name (`BUILTIN_ENVIRONMENTS`), then `package.module:function`, then an entry point of the group
``grpo_zero.environments``. The name stands for a factory; `make_environment` calls it with the
recipe's `rollout.tools.kwargs` (the built-in `python` also gets the typed `rollout.tools` fields:
markers, output cap, sandbox) and returns the environment (`rollout.turns.Environment`).
"""

from __future__ import annotations

from grpo.config import RolloutConfig, ToolsConfig
from rewards.registry import UnknownPluginError, resolve_plugin
from rollout.turns import Episodes, TurnLimits

ENTRY_POINT_GROUP = "grpo_zero.environments"
BUILTIN_ENVIRONMENTS = {"python": "rollout.tools.python_env:python_tool",
                        "openenv": "rollout.tools.openenv_env:openenv_environment"}


class UnknownEnvironmentError(UnknownPluginError):
    """An environment name that is neither built in, nor `module:function`, nor an entry point."""


def resolve_environment(name: str):
    """The factory an environment name stands for (raises `UnknownEnvironmentError`)."""
    return resolve_plugin(name, BUILTIN_ENVIRONMENTS, ENTRY_POINT_GROUP, kind="environment",
                          error=UnknownEnvironmentError)


def make_environment(tools: ToolsConfig, hide: list[str] = ()):
    """The recipe's environment, or None for one-turn rollouts. `hide`: directories the python tool's
    sandbox must not show (the run directory)."""
    if tools.environment is None:
        return None
    factory = resolve_environment(tools.environment)
    kwargs = dict(tools.kwargs)
    if tools.environment == "python" or factory is resolve_environment("python"):
        box = tools.sandbox
        kwargs = {"workers": box.workers, "timeout_s": box.timeout_s, "cpu_s": box.cpu_s, "memory_mb": box.memory_mb,
                  "processes": box.processes, "file_mb": box.file_mb, "tmp_mb": box.tmp_mb, "python": box.python,
                  "hide": [*box.hide, *hide], "unsandboxed": box.unsandboxed, "code_open": tools.code_open,
                  "code_close": tools.code_close, "output_open": tools.output_open,
                  "output_close": tools.output_close, "max_output_chars": tools.max_output_chars, **kwargs}
    env = factory(**kwargs)
    for attr in ("stop", "reset", "step"):
        if not hasattr(env, attr):
            raise UnknownEnvironmentError(f"environment {tools.environment!r}: its factory returned {type(env).__name__}, "
                                          f"which has no {attr!r} (see rollout/turns.py for the interface)")
    return env


def episodes_for(rollout: RolloutConfig, env, tokenizer, rows: list[dict], n: int, max_new_tokens: int) -> Episodes:
    """One episode per completion: `n` per data row, prompt-major."""
    t = rollout.tools
    limits = TurnLimits(max_turns=t.max_turns, max_turn_tokens=t.max_turn_tokens,
                        max_observation_tokens=t.max_observation_tokens)
    return Episodes(env, tokenizer, limits, [row for row in rows for _ in range(n)], max_new_tokens,
                    workers=t.sandbox.workers)
