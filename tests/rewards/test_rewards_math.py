"""math_answer policies, one row per decision (gold, completion, expected score)."""

import time

import pytest

from rewards.math import answers_match, math_answer
from rewards.mathparse import ParseError, TooBig, parse_answer

CASES = [
    # the tiny default task
    ("7", "<think>3+4 is 7</think><answer>7</answer>", 1.0),
    ("7", "<think>3+4 is 7</think><answer>8</answer>", 0.0),
    ("7", "<think>3+4 is 7</think>", 0.0),  # no answer
    ("7", "<think>3+4 is 7</think><answer></answer>", 0.0),  # empty answer
    ("7", "<think>3+4 is 7</think><answer> 7 </answer>\n", 1.0),
    ("7", "3+4 is 7</think><answer>7</answer>", 1.0),  # prefilled <think>
    # numbers
    ("-3", "<answer>\u22123</answer>", 1.0),  # unicode minus
    ("12", "<answer>\uff11\uff12</answer>", 1.0),  # full-width digits
    ("1000000", "<answer>1,000,000</answer>", 1.0),
    ("14916", "\\boxed{14{,}916}", 1.0),
    ("0.5", "<answer>\\frac{1}{2}</answer>", 1.0),
    ("1/2", "<answer>\\dfrac12</answer>", 1.0),
    ("0.5", "<answer>.5</answer>", 1.0),
    ("5", "<answer>5.001</answer>", 0.0),
    ("3.14", "<answer>\\pi</answer>", 0.0),  # strict default: a rounded decimal is not the exact value
    ("\\pi", "<answer>3.14</answer>", 0.0),  # (rounded_decimals=True accepts both: see below)
    ("\\pi", "<answer>3</answer>", 0.0),
    ("918\\frac{1}{2}", "<answer>918.5</answer>", 1.0),  # mixed number
    ("\\frac{1}{2^{99}}", "\\boxed{\\frac{1}{2^{98}}}", 0.0),  # exact, no chop
    ("\\frac{1}{2004!}", "\\boxed{\\frac{1}{2006!}}", 0.0),
    ("1-\\frac{1}{e}", "\\boxed{1+\\frac{1}{e}}", 0.0),
    # percent, units, degrees, text
    ("28\\%", "<answer>28</answer>", 1.0),
    ("28\\%", "<answer>0.28</answer>", 1.0),
    ("28\\%", "<answer>29\\%</answer>", 0.0),
    ("125", "\\boxed{125\\text{ miles}}", 1.0),
    ("90", "\\boxed{90^\\circ}", 1.0),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", 1.0),
    ("\\text{Evelyn}", "\\boxed{\\text{Briana}}", 0.0),
    # symbolic
    ("\\sqrt{1/n}", "\\boxed{\\frac{1}{\\sqrt{n}}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("x^2+2x+1", "\\boxed{(x-1)^2}", 0.0),
    ("\\tan^2(y)+1", "\\boxed{\\sec^2(y)}", 1.0),
    ("f(x)", "\\boxed{f(y)}", 0.0),  # strict by default
    # structures
    ("(1, 2)", "\\boxed{(1,2)}", 1.0),
    ("(1, 2)", "\\boxed{(2,1)}", 0.0),  # tuples are ordered
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}", 1.0),  # sets are not
    ("[0, 1)", "\\boxed{[0,1)}", 1.0),
    ("[0, 1)", "\\boxed{[0,1]}", 0.0),
    ("(-\\infty, 2] \\cup (3, \\infty)", "\\boxed{(3,\\infty)\\cup(-\\infty,2]}", 1.0),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}}", 1.0),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{\\begin{bmatrix}1&2\\\\3&5\\end{bmatrix}}", 0.0),
    ("1 \\pm \\sqrt{2}", "\\boxed{1+\\sqrt2, 1-\\sqrt2}", 1.0),
    # equations, inequalities
    ("2", "\\boxed{x = 2}", 1.0),
    ("x = 2", "\\boxed{2}", 1.0),
    ("2x+4y-3=0", "\\boxed{y=-\\frac{1}{2}x+\\frac{3}{4}}", 1.0),
    ("7 = 11a+c", "\\boxed{11a+c}", 0.0),
    ("x \\geq 5", "\\boxed{5 \\leq x}", 1.0),
    ("x < 1", "\\boxed{-x > -1}", 1.0),
    ("x < 1", "\\boxed{x > -1}", 0.0),
    ("-793 < a < 10", "\\boxed{(-793, 10)}", 1.0),
    # extraction policy
    ("2", "\\boxed{1} ... later, after more work, the result is \\boxed{2}", 0.0),  # boxes disagree: ambiguous
    ("2", "\\boxed{2} ... checking again, the result is \\boxed{2.0}", 1.0),  # boxes that agree
    ("\\{1, 2\\}", "\\boxed{1} and \\boxed{2}", 1.0),  # adjacent boxes are one answer
    ("3", "<answer>3 or 4</answer>", 0.0),  # hedging
    ("2021", "<answer>\\pm 2021</answer>", 0.0),
    ("12", "The final answer is $12$. I hope it is correct.", 1.0),
]


@pytest.mark.parametrize("gold,completion,expected", CASES)
def test_policy(gold, completion, expected):
    assert math_answer(completion, {"answer": gold}) == expected


def test_float_rounding_keyword():
    assert answers_match("1/3", "0.333", float_rounding=3)
    assert not answers_match("1/3", "0.333", float_rounding=4)


def test_limits_are_checked_before_any_algebra():
    for text in ["9^{9^{9^{9}}}", "100000!", "(10^{10})!", "1" * 5000, "{" * 5000 + "1" + "}" * 5000]:
        with pytest.raises((TooBig, ParseError)):
            parse_answer(text)


def test_integers_are_fast():
    ex = {"answer": "7"}
    completion = "<think>3+4 is 7</think><answer>7</answer>"
    math_answer(completion, ex)
    t = time.perf_counter()
    for _ in range(200):
        math_answer(completion, ex)
    per_item = (time.perf_counter() - t) / 200
    assert per_item < 0.02, per_item  # well under a millisecond on an idle core


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<answer>The answer is 42</answer>", 1.0),  # a phrase inside the tags
        ("<answer>So we get 42.</answer>", 1.0),  # the only number inside the tags
        ("<answer>I think 41 or maybe 42</answer>", 0.0),  # hedging in prose: no number is picked
        ("<answer>forty-two</answer>", 0.0),
        ("<answer>42 apples</answer>", 1.0),
        ("<answer>41</answer> but really 42", 0.0),  # nothing outside the tags counts
        ("AZYUK42A", 0.0),  # digits inside a word are not an answer
    ],
)
def test_answer_tag_contents(completion, expected):
    assert math_answer(completion, {"answer": "42"}) == expected


def test_decimal_approximations_of_exact_golds():
    lenient = {"rounded_decimals": True}  # the convention some graders use; strict (exact) is the default
    assert math_answer("<answer>0.67</answer>", {"answer": "2/3"}) == 0.0
    assert math_answer("<answer>0.67</answer>", {"answer": "2/3"}, **lenient) == 1.0
    assert math_answer("<answer>0.7</answer>", {"answer": "2/3"}, **lenient) == 0.0  # one decimal is a guess
    assert math_answer("<answer>\\pi</answer>", {"answer": "3.1"}, **lenient) == 1.0  # the gold's precision rules
    assert math_answer("<answer>3.14</answer>", {"answer": "\\pi"}, **lenient) == 1.0  # ... and the prediction's
    assert math_answer("<answer>0.5</answer>", {"answer": "1/2"}) == 1.0  # exact
