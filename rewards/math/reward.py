"""The math-answer reward: read both answers, then compare them (`answers_match`, `math_answer`)."""

from __future__ import annotations

from rewards.format import ANSWER_CLOSE, ANSWER_OPEN, answer_block
from rewards.math import choice, fallback
from rewards.math.compare import equivalent
from rewards.math.extract import NUMBER, after_think, candidates, is_bare
from rewards.math.parser import parse_answer
from rewards.math.values import Interval, ParseError, Relation, TooBig, Union


def _parse(candidate: str):
    """An `Answer`, None when it does not parse, False when over a limit or a quantified claim."""
    try:
        return parse_answer(candidate)
    except TooBig:
        return False
    except ParseError as e:
        return False if "quantified" in str(e) else None
    except (RecursionError, TypeError, ValueError, AttributeError, ZeroDivisionError):
        return None


def read_answer(text: str, fallback_ok: bool = False, plain_numbers: bool = True):
    """The answer in a text: marked candidates with our parser; for a tagged or bare answer that
    does not parse, math-verify's LaTeX parser on it (``fallback_ok``: the caller runs under a
    deadline); for unmarked prose, our weak candidates, then math-verify's parse of the text.
    None if nothing reads; False when an input limit was hit.
    """
    text = after_think(text)
    if not text.strip():
        return None
    cands = candidates(text)
    for c, strong in cands:
        if strong is True:
            a = _parse(c)
            if a is not None:
                return a
    marked = ANSWER_OPEN in text or is_bare(text)  # the tagged or bare answer is the whole answer
    use_mv = fallback_ok and fallback.available()
    if marked:  # math-verify may read it as LaTeX, but never pick a number out of it
        return fallback.mv_answer("$" + cands[0][0] + "$", False) if (use_mv and cands) else None
    for c, kind in cands:  # unmarked text: our reading of it first ...
        if kind is True or (kind == NUMBER and not plain_numbers):
            continue
        a = _parse(c)
        if a is not None:
            return a
    return fallback.mv_answer(text, plain_numbers) if use_mv else None  # ... then math-verify's


def answers_match(gold_text: str, pred_text: str, float_rounding: int | None = None, fallback: bool = True,
                  strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True, *,
                  bounded: bool = False, question: str | None = None) -> bool:
    """Extract, parse and compare. The core of `math_answer`, usable on its own.

    ``bounded``: the caller enforces a deadline and a memory limit (a sandbox worker), so
    math-verify's parser may run (when ``fallback`` allows it). ``question``: the problem text,
    if known (it tells a multiple-choice question and one that asks for a percent).

    >>> answers_match("7", "<think>3+4 is 7</think><answer>7</answer>")
    True
    >>> answers_match("$\\\\frac{1}{2^{99}}$", "$\\\\frac{1}{2^{98}}$")
    False
    """
    if not gold_text.strip() or not pred_text.strip():
        return False
    gold_c, pred_c = candidates(after_think(gold_text)), candidates(after_think(pred_text))
    if gold_c and pred_c and gold_c[0][1] is True and pred_c[0][1] is True and (
        " ".join(gold_c[0][0].split()) == " ".join(pred_c[0][0].split())
    ):
        return True  # the same answer, written the same way (even if our parser cannot read it)
    use_mv = fallback and bounded
    gold = read_answer(gold_text, use_mv, plain_numbers)
    if not gold:
        return False
    letter = choice.gold_letter(gold.value, question)
    if letter is not None:
        return choice.predicted_letter(after_think(pred_text)) == letter
    pred = read_answer(pred_text, use_mv, plain_numbers)
    if not pred:
        return False
    if not relation_as_set and isinstance(pred.value, Relation) and isinstance(gold.value, (Interval, Union)):
        return False
    try:
        return equivalent(gold, pred, float_rounding, strict, percent_question=choice.asks_percent(question))
    except (TypeError, ValueError, AttributeError, RecursionError, ZeroDivisionError):
        return False


def _question(example: dict, context: dict) -> str | None:
    """The problem text, where the example or the context carries one."""
    for value in (example.get("question"), example.get("problem"), context.get("prompt")):
        if isinstance(value, str) and value:
            return value
    options = example.get("choices") or example.get("options")
    return choice.options_text(options) if options else None


def math_answer(completion: str, example: dict, float_rounding: int | None = None, fallback: bool = True,
                strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True,
                answer_tag: bool = False, bounded: bool = False, **context) -> float:
    """1.0 when the completion's final answer equals the gold ``example["answer"]``, else 0.0.

    ``float_rounding``: compare decimals after rounding both sides to this many places (default:
    the tolerance follows the precision written). ``fallback``: let math-verify's parser read text
    that ours cannot (only when ``bounded``: the sandbox worker passes ``bounded=True``, since it
    enforces a deadline and a memory limit). ``strict=False``: a lone variable may be renamed
    (``f(x)`` matches ``f(y)``). ``plain_numbers=False``: in unmarked text only LaTeX counts, not a
    bare last number. ``relation_as_set=False``: a predicted relation (``-2 \\le x \\le 7``) does
    not match a gold set (``[-2, 7]``); the other way round always matches.
    ``answer_tag=True``: R1-Zero's accuracy reward: only the last closed ``<answer>...</answer>``
    is read, and a completion without one scores 0 however right its bare text is. The question
    (``example["question"]``, ``example["problem"]``, the ``prompt`` in the context, or
    ``example["choices"]``) tells a multiple-choice question and one that asks for a percent.

    >>> math_answer("<think>3+4 is 7</think><answer>7</answer>", {"answer": "7"})
    1.0
    >>> math_answer("<think>3+4 is 7</think><answer>8</answer>", {"answer": "7"})
    0.0
    >>> math_answer("no answer here, just some words that go on and on and on and on and on", {"answer": "7"})
    0.0
    >>> math_answer(" 7", {"answer": "7"}), math_answer(" 7", {"answer": "7"}, answer_tag=True)
    (1.0, 0.0)
    >>> math_answer("... so \\\\boxed{\\\\dfrac{14}{3}}", {"answer": "$\\\\frac{14}{3}$"})
    1.0
    """
    gold = example.get("answer")
    if gold is None or not isinstance(completion, str):
        return 0.0
    if answer_tag:
        inner = answer_block(completion)
        if inner is None:
            return 0.0
        completion = ANSWER_OPEN + inner + ANSWER_CLOSE
    ok = answers_match(str(gold), completion, float_rounding, fallback, strict, plain_numbers, relation_as_set,
                       bounded=bounded, question=_question(example, context))
    return 1.0 if ok else 0.0
