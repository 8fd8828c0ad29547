"""Reward plugins used by the rewards tests (imported as ``tests.rewards_plugins:<fn>``)."""

import asyncio
import time


def sleepy(completion, example, **context):
    """Sleeps for ``float(completion)`` seconds, then returns 1.0."""
    time.sleep(float(completion))
    return 1.0


def spin(completion, example, **context):
    """Busy-loops forever in pure Python when the completion says so."""
    if completion == "spin":
        while True:
            pass
    return 1.0


def raises_on_tenth(completion, example, **context):
    """Raises on every sample whose index (``example["i"]``) is a multiple of 10."""
    if example.get("i", 0) % 10 == 0:
        raise ValueError(f"boom on {example.get('i')}")
    return 0.5


def not_applicable(completion, example, **context):
    return None if completion == "skip" else 1.0


def hog_memory(completion, example, **context):
    """Allocates ``int(completion)`` MB."""
    block = bytearray(int(completion) * 1024 * 1024)
    return float(len(block) > 0)


async def async_len(completion, example, **context):
    await asyncio.sleep(0)
    return float(len(completion))


def crash(completion, example, **context):
    """Kills its own process (simulates a segfault in C code)."""
    import os
    import signal

    if completion == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


def huge_pow(completion, example, **context):
    """One C-level integer operation that runs for minutes (signal.alarm could not stop it)."""
    if completion == "pow":
        return float(9 ** (9 ** 9) % 7)
    return 1.0


def raises_one_in_ten(completion, example, sample_id="", **context):
    """Raises on every tenth sample of a training batch (sample ids end in `(#<index>)`)."""
    index = int(str(sample_id).rsplit("#", 1)[-1].rstrip(")") or 0)
    if index % 10 == 0:
        raise ValueError(f"plugin failure on {sample_id}")
    return 0.0
