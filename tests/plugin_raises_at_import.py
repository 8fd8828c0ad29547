"""A reward plugin whose module raises when imported (tests of the reward registry)."""

raise RuntimeError("this plugin module is broken at import")


def reward(completion, example, **context):  # never reached
    return 1.0
