"""The built-in `python` environment: a code block in the policy's turn runs in the sandbox, and
its output comes back wrapped in output tags.

The policy opens a block with `code_open` and closes it with `code_close` (the turn's stop
string); the environment runs the code of the last block of the turn in `rollout.tools.sandbox`
and answers ``output_open + output + output_close``. The output shown is at most
`max_output_chars` characters (the head of normal output, the tail of an error, where the
traceback's last line is), followed by one status line when the call did not end normally
("timeout", "output_limit", "killed"). A turn without an opened block, or that ended on another
stop string (the recipe's, e.g. "</answer>"), ends the episode.

    env = python_tool(workers=2)
    state = env.reset({})
    env.step(["Let me compute. <code>print(17 * 23)</code>"], state)
    # Observation(text='<output>391\\n</output>', tool_call=True, status='ok')
"""

from __future__ import annotations

from typing import Any

from rollout.tools.sandbox import Limits, PythonSandbox
from rollout.turns import Observation

STATUS_LINES = {"timeout": "[timed out]", "output_limit": "[output cut: too long]", "killed": "[killed]"}


class PythonTool:
    """The `python` environment over one `PythonSandbox` (see the module docstring)."""

    def __init__(self, sandbox: PythonSandbox, code_open: str = "<code>", code_close: str = "</code>",
                 output_open: str = "<output>", output_close: str = "</output>", max_output_chars: int = 512):
        if not code_open or not code_close:
            raise ValueError("the python tool needs non-empty code_open and code_close markers")
        self.sandbox = sandbox
        self.code_open, self.code_close = code_open, code_close
        self.output_open, self.output_close = output_open, output_close
        self.max_output_chars = max_output_chars
        self.stop = (code_close,)

    def reset(self, example: dict) -> dict[str, Any]:
        return {"calls": 0}

    def code_of(self, turn: str) -> str | None:
        """The code of the block `turn` ends with, or None (no block closed at its end)."""
        if not turn.endswith(self.code_close):
            return None
        body = turn[: -len(self.code_close)]
        start = body.rfind(self.code_open)
        if start < 0:
            return None
        return body[start + len(self.code_open):]

    def step(self, turns: list[str], state: dict[str, Any]) -> Observation | None:
        code = self.code_of(turns[-1])
        if code is None:
            return None
        state["calls"] += 1
        result = self.sandbox.run(code)
        return Observation(self.render(result.output, result.status), tool_call=True, status=result.status)

    def render(self, output: str, status: str) -> str:
        """What the policy reads for one call."""
        cap = self.max_output_chars
        if len(output) > cap:
            output = ("..." + output[-cap:]) if status == "error" else (output[:cap] + "...")
        line = STATUS_LINES.get(status)
        if line:
            output = f"{output}{'' if not output or output.endswith(chr(10)) else chr(10)}{line}\n"
        return f"{self.output_open}{output}{self.output_close}"

    def close(self) -> None:
        self.sandbox.close()


def python_tool(workers: int = 2, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, processes: int = 16,
                file_mb: int = 16, tmp_mb: int = 64, python: str = "/usr/bin/python3", hide: list[str] | None = None,
                unsandboxed: bool = False, code_open: str = "<code>", code_close: str = "</code>",
                output_open: str = "<output>", output_close: str = "</output>", max_output_chars: int = 512,
                output_bytes: int | None = None) -> PythonTool:
    """The `python` environment with its own sandbox pool (keyword names as in the recipe's
    `rollout.tools` and `rollout.tools.sandbox`)."""
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, processes=processes, file_mb=file_mb,
                    output_bytes=output_bytes or max(4 * max_output_chars, 4096), tmp_mb=tmp_mb)
    sandbox = PythonSandbox(workers=workers, limits=limits, python=python, hide=hide, unsandboxed=unsandboxed)
    return PythonTool(sandbox, code_open, code_close, output_open, output_close, max_output_chars)
