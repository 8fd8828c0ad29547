"""A reward plugin whose module never finishes importing (tests of the reward registry)."""

import time

time.sleep(3600)


def reward(completion, example, **context):  # never reached
    return 1.0
