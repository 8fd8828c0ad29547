"""A reward plugin for the asynchronous-RL tests (`tests.async_plugins:fails_on_call`)."""

import os
import time

_calls = {"n": 0}


def fails_on_call(completion, example, **context):
    """Scores 0.0, except that the Nth call in a process (N = $GRPO_TEST_FAIL_ON_CALL) raises; the
    time it raised is written to $GRPO_TEST_FAIL_STAMP."""
    _calls["n"] += 1
    if _calls["n"] == int(os.environ.get("GRPO_TEST_FAIL_ON_CALL", "0")):
        with open(os.environ["GRPO_TEST_FAIL_STAMP"], "w") as f:
            f.write(repr(time.time()))
        raise RuntimeError("planted failure in the generation process")
    return 0.0


def text_length(completion, example, **context):
    """len(completion) / 10: a reward that differs within a group even for a random-init model."""
    return len(completion) / 10
