"""The answer families of issue 15: for each rule, cases that must become true and close cases
that must stay false (a false positive is a reward hack). Each rule is stated next to its code."""

import pytest

from rewards.math import answers_match, math_answer

MC_QUESTION = "Which city is the capital of Australia? (A) Sydney (B) Melbourne (C) Canberra (D) Perth"
PERCENT_QUESTION = "What percent of the 40 students passed?"

# (family, gold, completion, question, expected)
CASES = [
    # mixed numbers: "W N/D" is W + N/D
    ("mixed", "11/2", "<answer>5 1/2</answer>", None, True),
    ("mixed", "5.5", "The answer is 5 1/2.", None, True),
    ("mixed", "3/2", "\\boxed{1 1/2}", None, True),
    ("mixed", "11/2", "<answer>1 1/2</answer>", None, False),  # 1 1/2 is 3/2, not 11/2
    ("mixed", "11/2", "<answer>11/2</answer>", None, True),
    ("mixed", "5/2", "<answer>5 1/2</answer>", None, False),
    ("mixed", "-11/2", "<answer>-5 1/2</answer>", None, True),
    ("mixed", "11/2", "<answer>5 3/2</answer>", None, False),  # not a proper fraction: no mixed number
    # scientific e-notation
    ("e-notation", "1500", "\\boxed{1.5e3}", None, True),
    ("e-notation", "1.5e3", "<answer>1500</answer>", None, True),
    ("e-notation", "0.00025", "<answer>2.5E-4</answer>", None, True),
    ("e-notation", "1500", "\\boxed{1.5e4}", None, False),
    ("e-notation", "0.0004", "<answer>2.5E-4</answer>", None, False),
    ("e-notation", "2e", "<answer>2</answer>", None, False),
    # percent when the question asks for a percent
    ("percent", "25", "<answer>0.25</answer>", PERCENT_QUESTION, True),
    ("percent", "0.25", "<answer>25</answer>", PERCENT_QUESTION, True),
    ("percent", "0.25", "<answer>25\\%</answer>", PERCENT_QUESTION, True),
    ("percent", "25", "<answer>0.25</answer>", "How many dollars did it cost after a 20% discount?", False),
    ("percent", "25", "<answer>0.25</answer>", None, False),
    ("percent", "25", "<answer>2.5</answer>", PERCENT_QUESTION, False),
    # an option letter in prose, and letter case
    ("letter", "C", "The correct option is (C).", None, True),
    ("letter", "C", "I think it's C", None, True),
    ("letter", "C", "\\boxed{c}", None, True),
    ("letter", "c", "\\boxed{C}", MC_QUESTION, True),
    ("letter", "C", "So I choose B.", None, False),
    ("letter", "C", "The answer is B or C.", None, False),  # hedging
    ("letter", "C", "I initially thought C. The final answer is D.", None, False),
    ("letter", "c", "\\boxed{C}", None, False),  # a lower-case gold is a letter only in a multiple-choice question
    ("letter", "B", "I think it is not A", None, False),
    # units on the gold side only
    ("units", "10\\text{ cm}", "<answer>10</answer>", None, True),
    ("units", "5 \\text{ meters}", "\\boxed{5}", None, True),
    ("units", "12\\text{ cm}^2", "\\boxed{12}", None, True),
    ("units", "10\\text{ cm}", "<answer>100</answer>", None, False),
    # times of day in another clock format
    ("time", "3:00 PM", "<answer>15:00</answer>", None, True),
    ("time", "15:30", "The answer is 3:30 p.m.", None, True),
    ("time", "12:00 AM", "<answer>0:00</answer>", None, True),
    ("time", "3:00 PM", "<answer>3:00 AM</answer>", None, False),
    ("time", "3:00 PM", "<answer>3:00</answer>", None, False),  # no marker: a 24-hour time
    ("time", "9:00 AM", "<answer>21:00</answer>", None, False),
    ("time", "7:32", "\\boxed{7:32}", None, True),  # a ratio stays a ratio
    # matrices and vectors written as lists, tuples against bare lists
    ("matrix", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{[1, 2]}", None, True),
    ("matrix", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{(1, 2)}", None, True),
    ("matrix", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{[[1,2],[3,4]]}", None, True),
    ("matrix", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{[2, 1]}", None, False),
    ("matrix", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{\\{1, 2\\}}", None, False),  # a set has no order
    ("matrix", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{[[1,3],[2,4]]}", None, False),
    ("matrix", "(1, 2, 3)", "\\boxed{[1, 2, 3]}", None, True),
    # convention (bench/data/README.md): a bare list is unordered, as Math-Verify's tests label it;
    # the same values in another order match, other values or a missing or extra value do not
    ("bare-list", "10, 4, -2", "<answer>4, 10, -2</answer>", None, True),
    ("bare-list", "0.1, 4, 2", "<answer>4, .1, 2</answer>", None, True),
    ("bare-list", "10, 4, -2", "<answer>4, 10, 2</answer>", None, False),
    ("bare-list", "10, 4, -2", "<answer>4, 10</answer>", None, False),
    ("bare-list", "10, 4", "<answer>4, 10, -2</answer>", None, False),
    ("bare-list", "(1, 2)", "<answer>(2, 1)</answer>", None, False),  # a tuple keeps its order
    # convention: a % sign on one side only accepts the same number or its hundredth (hendrycks,
    # NeMo-Skills and Math-Verify >= 0.9 label 10% ~ 10)
    ("percent-sign", "28\\%", "<answer>28</answer>", None, True),
    ("percent-sign", "28\\%", "<answer>0.28</answer>", None, True),
    ("percent-sign", "28", "<answer>28\\%</answer>", None, True),
    ("percent-sign", "28\\%", "<answer>2.8</answer>", None, False),
    ("percent-sign", "28\\%", "<answer>29</answer>", None, False),
    ("percent-sign", "28\\%", "<answer>0.29</answer>", None, False),
    # complex numbers in another algebraic form
    ("complex", "2i", "\\boxed{2e^{i\\pi/2}}", None, True),
    ("complex", "2i", "\\boxed{(1+i)^2}", None, True),
    ("complex", "\\frac{1+i}{3}", "\\boxed{\\frac{1}{3}+\\frac{i}{3}}", None, True),
    ("complex", "\\frac{1+i}{3}", "\\boxed{0.33+0.33i}", None, False),  # rounded: only with rounded_decimals
    ("complex", "2i", "\\boxed{(1-i)^2}", None, False),
    ("complex", "\\frac{1+i}{3}", "\\boxed{0.33+0.34i}", None, False),
    ("complex", "-1", "\\boxed{i}", None, False),
    # trigonometric identities
    ("trig", "\\sin 2x", "\\boxed{2\\sin x\\cos x}", None, True),
    ("trig", "\\cos 2\\theta", "\\boxed{1 - 2\\sin^2\\theta}", None, True),
    ("trig", "\\sin 2x", "\\boxed{2\\sin x}", None, False),
    ("trig", "\\sin x \\cos x", "\\boxed{\\sin 2x}", None, False),
    # a function by its name against y = ...
    ("function", "f(x) = x^2+1", "\\boxed{y = x^2 + 1}", None, True),
    ("function", "y = 2x+3", "\\boxed{f(x) = 2x + 3}", None, True),
    ("function", "f(x) = x^2+1", "\\boxed{y = x^2 - 1}", None, False),
    ("function", "y = 2x+3", "\\boxed{x = 2x + 3}", None, False),
    # an unmarked final statement "computation = value"
    ("final-equation", "7", "So 3 + 4 = 7", None, True),
    ("final-equation", "6", "so 10 - 4 = 6 apples", None, True),
    ("final-equation", "7", "So 3 + 4 = 8", None, False),
    ("final-equation", "7", "2x + 3 = 7", None, False),  # the left side has an unknown: 7 is not x
    ("final-equation", "7", "So 3 + 4 = 6 or 7", None, False),
]


@pytest.mark.parametrize("family,gold,completion,question,expected", CASES, ids=[
    f"{c[0]}-{i}-{'true' if c[4] else 'false'}" for i, c in enumerate(CASES)])
def test_family(family, gold, completion, question, expected):
    assert answers_match(gold, completion, question=question) is expected


def test_every_family_has_cases_both_ways():
    families = {c[0] for c in CASES}
    for family in families:
        verdicts = {c[4] for c in CASES if c[0] == family}
        assert verdicts == {True, False}, family


def test_the_question_reaches_the_reward_from_the_example_or_the_prompt():
    assert math_answer("<answer>0.25</answer>", {"answer": "25", "question": PERCENT_QUESTION}) == 1.0
    assert math_answer("<answer>0.25</answer>", {"answer": "25"}, prompt=PERCENT_QUESTION) == 1.0
    assert math_answer("<answer>0.25</answer>", {"answer": "25"}) == 0.0
    assert math_answer("\\boxed{C}", {"answer": "c", "choices": ["Sydney", "Melbourne", "Canberra"]}) == 1.0


def test_math_verify_runs_only_when_the_caller_says_it_is_bounded(monkeypatch):
    from rewards.math import fallback

    calls = []
    monkeypatch.setattr(fallback, "mv_answer", lambda text, plain: calls.append(text))
    answers_match("7", "some prose with no number at all, which our reading cannot use")
    assert calls == []
    answers_match("7", "some prose with no number at all, which our reading cannot use", bounded=True)
    assert calls == []  # strict default: unmarked prose is no answer, math-verify is not asked either
    answers_match("7", "some prose with no number at all, which our reading cannot use", bounded=True,
                  unmarked="last_value")
    assert len(calls) == 1
