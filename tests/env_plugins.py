"""Environments named by `module:function` in tests (the way `tests/rewards_plugins.py` names rewards).

`every_token_python`: every policy token ends a turn (its stop strings are every character of the
tiny tokenizer), and the turn's text is run as Python in the real sandbox, so that even a
random-init model makes tool calls (mostly syntax errors) in every rollout; two calls at most.
"""

from __future__ import annotations

from rollout.tools.python_env import PythonTool, python_tool


class _EveryTokenPython(PythonTool):
    def code_of(self, turn: str) -> str | None:
        return turn

    def step(self, turns, state):
        if state["calls"] >= 2:
            return None
        return super().step(turns, state)


def every_token_python(**kwargs) -> PythonTool:
    from grpo.model.tiny import CHARS

    tool = python_tool(**{"workers": 2, "timeout_s": 2.0, "max_output_chars": 8, "output_open": "(",
                          "output_close": ")", **kwargs})
    env = _EveryTokenPython(tool.sandbox, tool.code_open, tool.code_close, tool.output_open, tool.output_close,
                            tool.max_output_chars)
    env.stop = tuple(CHARS)
    return env
