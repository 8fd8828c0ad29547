"""The one error boundary of the `grpo` verbs: which exceptions are the user's to fix.

A user error (bad data, model, checkpoint or recipe, a full disk, a missing file, a reward that
cannot be found, a busy port) becomes one line that names the file, row or key, and exit status
2; `grpo -v VERB ...` also prints its traceback. Anything else is a bug in grpo-zero or a library,
and keeps its traceback.

Each floor declares its own user errors as subclasses of `UserError` (`ConfigError`, `DataError`,
`ModelError`, `ResumeError`, `UnsupportedError`); the rewards package's own (`RewardError`,
`UnknownRewardError`) and the vLLM engine's sizing error (`EngineSizeError`) are recognised here by type.
"""

from __future__ import annotations

import errno

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class UserError(ValueError):
    """A problem the user fixes (a recipe, data, model, checkpoint or process layout), phrased for a
    person: its message is the one line `grpo` prints."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (its type when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def describe(exc: BaseException) -> str | None:
    """The one line to print for a user error; None for anything else (a bug: show its traceback)."""
    from rewards import RewardError, UnknownRewardError
    from rollout.vllm.sizing import EngineSizeError

    if isinstance(exc, (UserError, RewardError, UnknownRewardError, EngineSizeError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"no space left on device{where}: {exc.strerror or exc}; free some space or write elsewhere (--output-dir)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"the port is already in use ({exc.strerror}); choose another with --port"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return None
