"""Running one reward on one item: the status it ends with and the one exception policy.

An item is ``(name, kwargs, completion, example, context)``; `run_item` returns
``(status, value, message)`` with status `OK` (value a finite float, or None: "does not apply"),
`ERROR` (the reward raised, returned a non-finite value, or ran out of memory; value None) or, set
by the worker pool only, `TIMEOUT`. Both the in-process scorer (`rewards.scorer`) and the sandbox
workers (`rewards.sandbox`) run items through `run_item`, so a reward fails the same way in both.

A reward may give a reason with a score by returning a `Scored` (a float with a ``reason``); the
reason travels as the item's message with status `OK`, and the scorer counts it as
``reward/<name>/<reason>`` for every reason the function lists in its ``reasons`` attribute.

Exception policy: every ``Exception`` a reward raises, and ``SystemExit``, becomes an `ERROR` with
a message of at most 300 characters; ``KeyboardInterrupt`` and other ``BaseException``s propagate
(in a worker that ends the worker, which the pool reports as an error).

Where a reward runs is told to it, never read from a global: a reward that declares a ``bounded``
parameter gets ``bounded=True`` when the caller enforces a deadline and a memory limit (a sandbox
worker) and ``bounded=False`` in process.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers

from rewards.registry import resolve

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
MAX_MESSAGE = 300


class Scored(float):
    """A reward value with the reason it was given (``Scored(0.0, "unreadable")``); it is a float.

    >>> v = Scored(0.0, "unreadable")
    >>> v == 0.0, v.reason
    (True, 'unreadable')
    """

    reason: str

    def __new__(cls, value: float, reason: str = ""):
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj

    def __reduce__(self):
        return (Scored, (float(self), self.reason))


@functools.cache
def _declares_bounded(fn) -> bool:
    try:
        return "bounded" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_reward(fn, completion: str, example: dict, context: dict, kwargs: dict, bounded: bool = False):
    """Call one reward, sync or async; returns a float or None. Exceptions propagate.

    >>> call_reward(lambda c, e, **k: len(c), "abc", {}, {}, {})
    3.0
    """
    extra = {k: v for k, v in {**context, **kwargs}.items() if k not in ("completion", "example", "bounded")}
    if _declares_bounded(fn):
        extra["bounded"] = bounded
    out = fn(completion, example, **extra)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    if out is None:
        return None
    if not isinstance(out, numbers.Real):  # a string "0.75", a tensor, a list: an error, never coerced
        raise TypeError(f"reward returned {type(out).__name__} {str(out)[:40]!r}, not a number (return a float or None)")
    value = float(out)
    if not math.isfinite(value):
        raise ValueError(f"reward returned {value}")
    reason = getattr(out, "reason", "")
    return Scored(value, reason) if isinstance(reason, str) and reason else value


async def _await(awaitable):
    return await awaitable


def _message(e: BaseException, memory_mb: int | None) -> str:
    if isinstance(e, MemoryError):
        return f"MemoryError (over the {memory_mb} MB limit)" if memory_mb else "MemoryError"
    try:
        return f"{type(e).__name__}: {str(e)[:MAX_MESSAGE]}"
    except Exception:  # noqa: BLE001 - even str() of the error may fail
        return type(e).__name__


def run_item(item, bounded: bool = False, memory_mb: int | None = None) -> tuple[str, object, str]:
    """``(status, value, message)`` for one item (see the module docstring for the policy).

    >>> run_item(("format", {}, "<think>x</think><answer>1</answer>", {}, {}))
    ('ok', 1.0, '')
    >>> run_item(("tests.no_such_module:f", {}, "", {}, {}))[0]
    'error'
    """
    name, kwargs, completion, example, context = item
    try:
        value = call_reward(resolve(name), completion, example, context, kwargs, bounded)
        if isinstance(value, Scored):  # the reason travels as the message; the value as a plain float
            return OK, float(value), value.reason[:MAX_MESSAGE]
        return OK, value, ""
    except (Exception, SystemExit) as e:  # a reward that fails must not stop the run
        return ERROR, None, _message(e, memory_mb)
