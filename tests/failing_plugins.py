"""Reward plugins that never work, for the reward-failure tests (`tests.failing_plugins:<fn>`)."""


def always_raises(completion, example, **context):
    raise RuntimeError("this reward is broken")


def returns_a_string(completion, example, **context):
    return "0.75"


def always_sleeps(completion, example, **context):
    import time

    time.sleep(60)
    return 1.0
