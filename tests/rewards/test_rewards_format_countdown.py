"""Format rewards (linear time, prefilled <think>), countdown's evaluator."""

import time
from fractions import Fraction

import pytest

from rewards.countdown import ArithmeticError_, countdown, evaluate_arithmetic
from rewards.format import format_partial, format_reward

PROMPT = "User: what is 3+4?\nAssistant:"
PREFILLED = "<|im_start|>assistant\n<think>\n"


@pytest.mark.parametrize(
    "completion,prompt,strict,partial",
    [
        ("<think>3+4 is 7</think><answer>7</answer>", PROMPT, 1.0, 1.0),
        ("<think>3+4 is 7</think>\n<answer>7</answer>\n", PROMPT, 1.0, 1.0),
        ("3+4 is 7</think><answer>7</answer>", PREFILLED, 1.0, 1.0),
        ("<think>3+4 is 7</think><answer>7</answer>", PREFILLED, 0.0, 0.5),  # opened twice
        ("3+4 is 7</think><answer>7</answer>", PROMPT, 0.0, 0.5),  # never opened
        ("<think>3+4 is 7</think><answer>7</answer>trailing", PROMPT, 0.0, 0.75),
        ("<think>3+4 is 7</think>so<answer>7</answer>", PROMPT, 0.0, 0.75),
        ("<think>3+4 is 7</think><answer> </answer>", PROMPT, 0.0, 0.75),
        ("<think>a</think><answer>7</answer><answer>8</answer>", PROMPT, 0.0, 0.25),
        ("", PROMPT, 0.0, 0.0),
    ],
)
def test_format_table(completion, prompt, strict, partial):
    assert format_reward(completion, {}, prompt=prompt) == strict
    assert format_partial(completion, {}, prompt=prompt) == partial


def test_format_is_linear_on_repeated_tags():
    # the classic backtracking regex takes seconds here; counting and finding tags does not
    for text in ["<think>" * 200_000, "<think></think>" * 100_000 + "<answer>", "<answer>x" * 100_000]:
        t = time.perf_counter()
        format_reward(text, {})
        format_partial(text, {})
        assert time.perf_counter() - t < 1.0  # milliseconds in practice


def test_arithmetic_evaluator_accepts_only_arithmetic():
    assert evaluate_arithmetic("(1 + 2) * 3 - 4 / 2") == (Fraction(7), [1, 2, 3, 4, 2])
    for bad in ["2**10", "__import__('os')", "1e9", "9^9", "a+1", "(" * 100 + "1" + ")" * 100, "1" * 20, "1/0", ""]:
        with pytest.raises(ArithmeticError_):
            evaluate_arithmetic(bad)


def test_countdown():
    ex = {"target": 24, "numbers": [4, 6, 1, 1]}
    assert countdown("<think>..</think><answer>4 * 6 * 1 * 1</answer>", ex) == 1.0
    assert countdown("<answer>(4 * 6) / (1 * 1) = 24</answer>", ex) == 1.0
    assert countdown("<answer>4 * 6 * 1</answer>", ex) == 0.1  # a number unused
    assert countdown("<answer>4 * 6 * 1 * 1 * 1</answer>", ex) == 0.1  # used twice
    assert countdown("<answer>4 + 6 + 1 + 1</answer>", ex, format_score=0.0) == 0.0
    assert countdown("no tags", ex) == 0.0
