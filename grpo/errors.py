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
import re
import shutil
from pathlib import Path

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# How libraries that wrap an I/O failure in their own exception type word a full disk (safetensors and
# tokenizers are Rust: "I/O error: No space left on device (os error 28)"; 122 is EDQUOT).
NO_SPACE_TEXT = re.compile(r"no space left on device|disk quota exceeded|os error (?:28|122)\b", re.IGNORECASE)
IO_TEXT = re.compile(r"write|i/o|iostream|unexpected pos|serializ", re.IGNORECASE)  # a failed write, in any wording
LOW_SPACE_BYTES = 64 << 20  # a failed write with less free than this was a full disk


class UserError(ValueError):
    """A problem the user fixes (a recipe, data, model, checkpoint or process layout), phrased for a
    person: its message is the one line `grpo` prints."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (its type when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (bounded: a cycle ends it)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 16 and not any(exc is e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def out_of_space(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota: an OSError with that errno, a
    library's error that says so, or, for a write to `path` that failed with a bare I/O message
    (torch.save: "unexpected pos", "file write failed"), less than 64 MiB free there."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if NO_SPACE_TEXT.search(str(e)):
            return True
    if path is not None and any(IO_TEXT.search(str(e)) for e in causes(exc)):
        try:
            return shutil.disk_usage(path).free < LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def describe(exc: BaseException) -> str | None:
    """The one line to print for a user error; None for anything else (a bug: show its traceback)."""
    from rewards import RewardError, UnknownRewardError
    from rollout.vllm.sizing import EngineSizeError

    if isinstance(exc, (UserError, RewardError, UnknownRewardError, EngineSizeError)):
        return str(exc)
    if out_of_space(exc):
        where = next((f" ({e.filename})" for e in causes(exc) if isinstance(e, OSError) and e.filename), "")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        return f"no space left on device{where}: {reason}; free some space or write elsewhere (--output-dir)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"the port is already in use ({exc.strerror}); choose another with --port"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return None
