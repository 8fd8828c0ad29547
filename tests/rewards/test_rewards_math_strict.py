"""The answer families of issue 31: for each rule, cases that must become true beside close cases
that must stay false (a false positive is a reward hack); the unreadable reason and the strict
conventions with their options. Each rule is stated in the docstring of the code that applies it."""

import time

import pytest

from rewards import RewardSpec, Scorer
from rewards.math import answers_match, match_verdict, math_answer

# (family, gold, completion, expected)
CASES = [
    # a number with junk or a malformed command after it is not that number (extract.clean_number)
    ("junk-after-number", "4", "\\boxed{4 ...}", False),
    ("junk-after-number", "4", "<answer>4 ??</answer>", False),
    ("junk-after-number", "2", "The answer is 4\\sqrt(2).", False),
    ("junk-after-number", "2", "So the result is 4\\sqrt(2)", False),
    ("junk-after-number", "4", "4 sqrt 2 ...", False),
    ("junk-after-number", "4", "\\boxed{4.}", True),
    ("junk-after-number", "4", "<answer>The total is 4 apples</answer>", True),
    ("junk-after-number", "4\\sqrt{2}", "\\boxed{4 \\sqrt 2}", True),
    # no assumption on symbols: each side real exactly where the other is (numbers.agree_at_points)
    ("assumption", "x", "\\boxed{\\sqrt{x^2}}", False),
    ("assumption", "x", "sqrt(x^2)", False),
    ("assumption", "\\ln(xy)", "\\boxed{\\ln x + \\ln y}", False),
    ("assumption", "|x|", "sqrt(x^2)", True),
    ("assumption", "x", "\\boxed{(\\sqrt{x})^2}", True),
    ("assumption", "x-1", "\\boxed{\\frac{x^2-1}{x+1}}", True),
    # no numeric tolerance inside a symbolic expression (numbers.exprs_equal)
    ("symbolic-tolerance", "\\pi x + 3.14159", "\\boxed{\\pi x + 3.14160}", False),
    ("symbolic-tolerance", "x + 1.00001", "\\boxed{x + 1}", False),
    ("symbolic-tolerance", "\\pi r^2", "\\boxed{3.14159 r^2}", False),
    ("symbolic-tolerance", "x + 0.5", "\\boxed{x + \\frac{1}{2}}", True),
    # a whole-solution gold is reduced to its final answer; a completion concluding otherwise fails
    ("solution-gold", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "\\boxed{24}", False),
    ("solution-gold", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "\\boxed{72}", True),
    ("solution-gold", "The sum is $3+4=7$, and doubling gives $14$.", "\\boxed{7}", False),
    ("solution-gold", "The sum is $3+4=7$, and doubling gives $14$.", "\\boxed{14}", True),
    # GSM8K's "#### 42" marker (extract.candidates)
    ("gsm8k-marker", "42", "She has 40+2 = 42 apples.\n#### 42", True),
    ("gsm8k-marker", "42", "<think>maybe 41</think>\n#### 42", True),
    ("gsm8k-marker", "42", "<think>it is 42</think>\n#### 41", False),
    ("gsm8k-marker", "42", "First 42 \n#### 4 2 1", False),
    # \box{} is \boxed{}; boxes that agree are one answer, boxes that disagree are ambiguous
    ("boxes", "5", "\\box{5}", True),
    ("boxes", "5", "\\box{6}", False),
    ("boxes", "\\frac{5}{2}", "So \\boxed{2\\frac{1}{2}}, that is \\boxed{\\frac{5}{2}}", True),
    ("boxes", "\\frac{5}{2}", "First \\boxed{3}. Actually the answer is \\boxed{\\frac{5}{2}}", False),
    ("boxes", "\\frac{5}{2}", "\\boxed{\\frac{5}{2}}\n\nVerification: 2 * 5/2 = 5, so the answer checks out.", True),
    ("boxes", "\\frac{5}{2}", "\\boxed{\\frac{5}{2}}\n\nVerification: 2 * 5/2 = 5. Wait, the answer is \\boxed{3}.", False),
    # "Answer: a + b + ... = 81" and the closing align block give the right-hand side
    ("rhs", "81", "Answer: 2*7 + 3*6 + ... = 81", True),
    ("rhs", "81", "Answer: 2*7 + 3*6 + ... = 80", False),
    ("rhs", "81", "\\[\\begin{align*} S &= 2\\cdot 7 + 3\\cdot 6 + 49 \\\\ &= 81 \\end{align*}\\]", True),
    ("rhs", "81", "\\[\\begin{align*} S &= 2\\cdot 7 + 3\\cdot 6 + 49 \\\\ &= 80 \\end{align*}\\]", False),
    ("rhs", "2", "$17 \\bmod 5 = 2$", True),
    ("rhs", "3", "$17 \\bmod 5 = 2$", False),
    # plain algebra from computer-algebra graders, compared at points, never expanded
    ("plain-algebra", "log((x+1)/(1-x))", "-log((1-x)/(x+1))", True),
    ("plain-algebra", "log((x+1)/(1-x))", "log((1-x)/(x+1))", False),
    ("plain-algebra", "(x-a)^6000", "(a-x)^6000", True),
    ("plain-algebra", "(x-a)^6001", "(a-x)^6001", False),
    ("plain-algebra", "(x-a)^6000", "(a-x)^5999", False),
    # inequalities with the same real solution set
    ("inequality", "x > 2", "2x > 4", True),
    ("inequality", "x > 3", "2^x > 8", True),
    ("inequality", "x > 2", "x^3 > 8", True),
    ("inequality", "x > 2", "-2x > -4", False),
    ("inequality", "x > 2", "x^2 > 4", False),
    ("inequality", "x > 3", "2^x > 9", False),
    # unit words in any script after a number, also in ';' lists
    ("units", "5", "<answer>5 \u7c73</answer>", True),
    ("units", "12", "The answer is 12 \u044f\u0431\u043b\u043e\u043a.", True),
    ("units", "5 m; 3 s", "\\boxed{5 \u7c73; 3 \u79d2}", True),
    ("units", "5; 3", "<answer>5 \u043c; 3 \u0441</answer>", True),
    ("units", "5 m; 3 s", "\\boxed{5 \u7c73; 4 \u79d2}", False),
    ("units", "5", "<answer>6 \u7c73</answer>", False),
]


@pytest.mark.parametrize("family,gold,completion,expected", CASES, ids=[
    f"{c[0]}-{i}-{str(c[3]).lower()}" for i, c in enumerate(CASES)])
def test_family(family, gold, completion, expected):
    t0 = time.perf_counter()
    assert answers_match(gold, completion) is expected
    assert time.perf_counter() - t0 < 5.0  # every reading stays bounded (SymPy's first solveset call is ~2 s)


def test_every_family_has_cases_both_ways():
    families = {c[0] for c in CASES}
    for fam in families:
        assert {c[3] for c in CASES if c[0] == fam} == {True, False}, fam


def test_unreadable_answers_score_zero_with_the_reason():
    for completion in ("prose with no marker that ends in 7", "\\boxed{3} then \\boxed{7}", "\\boxed{4\\sqrt(2)}", ""):
        ok, reason = match_verdict("7", completion)
        assert (ok, reason) == (False, "unreadable"), completion
    assert match_verdict("7", "\\boxed{8}") == (False, "")  # read, and wrong: not unreadable
    assert math_answer("words then 7", {"answer": "7"}).reason == "unreadable"


def test_the_scorer_counts_the_unreadable_reason_in_workers_and_in_process():
    for workers in (0, 1):
        with Scorer([RewardSpec("math_answer")], workers=workers) as s:
            r = s.score(["\\boxed{7}", "the total comes to 7 I believe", "\\boxed{1}, then later \\boxed{2}", "\\boxed{8}"], [{"answer": "7"}] * 4)
        assert r.per_function["math_answer"] == [1.0, 0.0, 0.0, 0.0]
        assert r.metrics["reward/math_answer/unreadable"] == 2.0
        with Scorer([RewardSpec("math_answer")], workers=workers) as s:  # the key is there when nothing is unreadable
            assert s.score(["\\boxed{7}"], [{"answer": "7"}]).metrics["reward/math_answer/unreadable"] == 0.0


@pytest.mark.parametrize("option,gold,completion", [
    ({"rounded_decimals": True}, "\\pi", "<answer>3.14</answer>"),
    ({"rounded_decimals": True}, "1/3", "\\boxed{0.333}"),
    ({"unmarked": "last_value"}, "7", "so after all that work we get 7"),
    ({"unmarked": "last_math"}, "7", "so after all that work we get $7$"),
    ({"unterminated_box": True}, "7", "so the answer is \\boxed{7"),
])
def test_each_convention_is_strict_by_default_and_lenient_when_asked(option, gold, completion):
    assert math_answer(completion, {"answer": gold}) == 0.0
    assert math_answer(completion, {"answer": gold}, **option) == 1.0


def test_the_lenient_options_keep_their_own_limits():
    assert math_answer("\\boxed{0.7}", {"answer": "2/3"}, rounded_decimals=True) == 0.0  # one decimal is a guess
    assert math_answer("so we get $7$ and then $8$", {"answer": "7"}, unmarked="last_math") == 0.0
    assert math_answer("so we get 4\\sqrt(2)", {"answer": "2"}, unmarked="last_value") == 0.0
    assert math_answer("the answer is \\boxed{7 and more", {"answer": "7"}, unterminated_box=True) == 0.0
    with pytest.raises(ValueError, match="unmarked"):
        math_answer("\\boxed{7}", {"answer": "7"}, unmarked="guess")


@pytest.mark.parametrize("completion", ["\\boxed{(x-a)^{10001}}", "\\boxed{(10^{300} x)^{5000}}"])
def test_huge_symbolic_powers_are_refused_quickly(completion):
    t0 = time.perf_counter()
    assert answers_match("(x-a)^2", completion) is False
    assert time.perf_counter() - t0 < 1.0
