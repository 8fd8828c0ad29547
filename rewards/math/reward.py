"""The math-answer reward: read both answers, then compare them (`answers_match`, `math_answer`)."""

from __future__ import annotations

import sympy

from rewards.format import ANSWER_CLOSE, ANSWER_OPEN, answer_block
from rewards.math import choice, fallback
from rewards.math.compare import equivalent
from rewards.math.extract import (
    MAX_SCAN_CHARS,
    NUMBER,
    PHRASE,
    _strip_delims,
    after_think,
    box_groups,
    candidates,
    is_bare,
)
from rewards.math.parser import parse_answer
from rewards.math.values import Interval, ParseError, Relation, TooBig, Union
from rewards.run import Scored


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


UNREADABLE = "unreadable"  # the reason counted as ``reward/math_answer/unreadable``
UNMARKED = ("reject", "last_math", "last_value")  # what unmarked prose may give (see `math_answer`)


def read_answer(text: str, fallback_ok: bool = False, unmarked: str = "last_value", open_box: bool = False,
                plain_numbers: bool = True):
    """The answer in a text, or None if nothing reads (False when an input limit was hit).

    Rules, in order: a marked answer (tags, box, ``####``, a bare answer, a closing computation)
    is read by our parser, or else, when it ends in ``= value``, is that value, or else (when it
    holds a LaTeX command) is read by math-verify's LaTeX parser on that same string
    (``fallback_ok``: the caller runs under a deadline), never by a number picked out of it; a
    final-answer phrase in prose gives its one clean number or math segment; prose with no marker
    gives nothing under ``unmarked="reject"``, its last math segment under ``"last_math"``, and its
    last math segment or clean number (or math-verify's reading) under ``"last_value"``.
    """
    text = after_think(text)
    if not text.strip():
        return None
    cands = candidates(text, open_box)
    for c, kind in cands:
        if kind is True or kind == PHRASE:
            a = _parse(c)
            if a is not None:
                return a
    use_mv = fallback_ok and fallback.available()
    strong = [c for c, kind in cands if kind is True]
    for c in strong[:1]:  # "\\lim_{x \\to 0} \\frac{\\sin x}{x} = 1": a computation we cannot read, judged by its result
        a = _computed_value(c)
        if a is not None:
            return a
    if strong or ANSWER_OPEN in text or is_bare(text):  # marked: math-verify may read it as LaTeX, nothing else
        latex = strong and "\\" in strong[0]  # without a LaTeX command its reading is no better than ours
        return fallback.mv_answer("$" + strong[0] + "$", False) if (use_mv and latex) else None
    if any(kind == PHRASE for _, kind in cands) or unmarked == "reject":
        return None
    for c, kind in cands:  # unmarked text: our reading of it first ...
        if kind == NUMBER and (unmarked != "last_value" or not plain_numbers):
            continue
        a = _parse(c)
        if a is not None:
            return a
    return fallback.mv_answer(text, plain_numbers) if (use_mv and unmarked == "last_value") else None


def _computed_value(candidate: str):
    """A marked answer that does not parse but ends in ``= value``, with a value free of symbols,
    is that value (the right-hand side of its last ``=``); else None."""
    left, eq, right = candidate.rpartition("=")
    if not eq or not left.strip() or left.rstrip()[-1] in "<>!:":
        return None
    a = _parse(right)
    if not a or not isinstance(a.value, sympy.Basic) or a.value.free_symbols:
        return None
    return a


def _boxes_agree(text: str, open_box: bool) -> bool:
    """When the answer read is a box, the boxed answers in the read part of a completion (its
    ``<answer>`` block, if any) all equal one another (``2\\frac{1}{2}`` and ``\\frac{5}{2}``
    agree); two that differ, or one that does not parse beside another, make it ambiguous. A
    final-answer phrase after the last box is the answer whatever the boxes before it hold."""
    scope = answer_block(after_think(text), closed=False)
    scope = after_think(text) if scope is None else scope
    groups = box_groups(scope, open_box)
    if len(groups) < 2:
        return True
    cands = candidates(scope, open_box)
    if cands and cands[0][0] not in (groups[-1].strip(), _strip_delims(groups[-1])):
        return True  # a final-answer phrase after the boxes is the answer; the boxes were working
    first = _parse(_strip_delims(groups[0]))
    for g in groups[1:]:
        other = _parse(_strip_delims(g))
        if not first or not other:
            return False
        try:
            if not equivalent(first, other):
                return False
        except (TypeError, ValueError, AttributeError, RecursionError, ZeroDivisionError):
            return False
    return True


def read_prediction(text: str, fallback_ok: bool = False, unmarked: str = "reject", open_box: bool = False,
                    plain_numbers: bool = True):
    """A completion's final answer, or None when it cannot be read unambiguously: nothing reads
    (`read_answer`), an input limit was hit, or the boxed answers in it disagree."""
    pred = read_answer(text, fallback_ok, unmarked, open_box, plain_numbers)
    if not pred or not _boxes_agree(text[-MAX_SCAN_CHARS:], open_box):
        return None
    return pred


def match_verdict(gold_text: str, pred_text: str, float_rounding: int | None = None, fallback: bool = True,
                  strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True, *,
                  bounded: bool = False, question: str | None = None, rounded_decimals: bool = False,
                  unmarked: str = "reject", open_box: bool = False) -> tuple[bool, str]:
    """`answers_match`, with the reason for a 0: ``"unreadable"`` when the completion's final answer
    cannot be read unambiguously, ``""`` otherwise."""
    if unmarked not in UNMARKED:
        raise ValueError(f"unmarked must be one of {UNMARKED}, not {unmarked!r}")
    if not gold_text.strip():
        return False, ""
    if not pred_text.strip():
        return False, UNREADABLE
    gold_c, pred_c = candidates(after_think(gold_text)), candidates(after_think(pred_text), open_box)
    if gold_c and pred_c and gold_c[0][1] is True and pred_c[0][1] is True and (
        " ".join(gold_c[0][0].split()) == " ".join(pred_c[0][0].split())
    ) and len(box_groups(after_think(pred_text)[-MAX_SCAN_CHARS:], open_box)) <= 1:
        return True, ""  # the same answer, written the same way (even if our parser cannot read it)
    use_mv = fallback and bounded
    gold = read_answer(gold_text, use_mv, "last_value", open_box, plain_numbers)  # the gold is trusted text
    if not gold:
        return False, ""
    letter = choice.gold_letter(gold.value, question)
    if letter is not None:
        got = choice.predicted_letter(after_think(pred_text))
        return got == letter, ("" if got is not None else UNREADABLE)
    pred = read_prediction(pred_text, use_mv, unmarked, open_box, plain_numbers)
    if not pred:
        return False, UNREADABLE
    if not relation_as_set and isinstance(pred.value, Relation) and isinstance(gold.value, (Interval, Union)):
        return False, ""
    try:
        return equivalent(gold, pred, float_rounding, strict, percent_question=choice.asks_percent(question),
                          rounded_decimals=rounded_decimals), ""
    except (TypeError, ValueError, AttributeError, RecursionError, ZeroDivisionError):
        return False, ""


def answers_match(gold_text: str, pred_text: str, float_rounding: int | None = None, fallback: bool = True,
                  strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True, *,
                  bounded: bool = False, question: str | None = None, rounded_decimals: bool = False,
                  unmarked: str = "reject", open_box: bool = False) -> bool:
    """Extract, parse and compare. The core of `math_answer`, usable on its own.

    ``bounded``: the caller enforces a deadline and a memory limit (a sandbox worker), so
    math-verify's parser may run (when ``fallback`` allows it). ``question``: the problem text,
    if known (it tells a multiple-choice question and one that asks for a percent). The
    conventions (``rounded_decimals``, ``unmarked``, ``open_box``) are those of `math_answer`.

    >>> answers_match("7", "<think>3+4 is 7</think><answer>7</answer>")
    True
    >>> answers_match("$\\\\frac{1}{2^{99}}$", "$\\\\frac{1}{2^{98}}$")
    False
    """
    return match_verdict(gold_text, pred_text, float_rounding, fallback, strict, plain_numbers, relation_as_set,
                         bounded=bounded, question=question, rounded_decimals=rounded_decimals, unmarked=unmarked,
                         open_box=open_box)[0]


def _question(example: dict, context: dict) -> str | None:
    """The problem text, where the example or the context carries one."""
    for value in (example.get("question"), example.get("problem"), context.get("prompt")):
        if isinstance(value, str) and value:
            return value
    options = example.get("choices") or example.get("options")
    return choice.options_text(options) if options else None


def math_answer(completion: str, example: dict, float_rounding: int | None = None, fallback: bool = True,
                strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True,
                answer_tag: bool = False, bounded: bool = False, rounded_decimals: bool = False,
                unmarked: str = "reject", unterminated_box: bool = False, **context) -> float:
    """1.0 when the completion's final answer equals the gold ``example["answer"]``, else 0.0;
    a 0.0 because the final answer cannot be read unambiguously carries the reason
    ``"unreadable"`` (counted as ``reward/math_answer/unreadable``).

    Conventions that graders disagree on, strict by default (the recipe's ``rewards.math_answer``
    block sets them): ``rounded_decimals=True``: a decimal matches an exact value it rounds to at
    the precision written (``3.14`` for ``\\pi``; default: only an exactly equal value);
    ``unmarked``: what prose without a final-answer marker gives: ``"reject"`` (nothing),
    ``"last_math"`` (its last math segment), ``"last_value"`` (its last math segment or clean
    number); ``unterminated_box=True``: a last ``\\boxed{`` never closed runs to the end.

    ``float_rounding``: compare decimals after rounding both sides to this many places.
    ``fallback``: let math-verify's parser read text that ours cannot (only when ``bounded``: the
    sandbox worker passes ``bounded=True``, since it enforces a deadline and a memory limit).
    ``strict=False``: a lone variable may be renamed (``f(x)`` matches ``f(y)``).
    ``plain_numbers=False``: in unmarked text only LaTeX counts, not a bare last number.
    ``relation_as_set=False``: a predicted relation (``-2 \\le x \\le 7``) does not match a gold
    set (``[-2, 7]``); the other way round always matches. ``answer_tag=True``: R1-Zero's accuracy
    reward: only the last closed ``<answer>...</answer>`` is read, and a completion without one
    scores 0 however right its bare text is. The question (``example["question"]``,
    ``example["problem"]``, the ``prompt`` in the context, or ``example["choices"]``) tells a
    multiple-choice question and one that asks for a percent.

    >>> math_answer("<think>3+4 is 7</think><answer>7</answer>", {"answer": "7"})
    1.0
    >>> math_answer("<think>3+4 is 7</think><answer>8</answer>", {"answer": "7"})
    0.0
    >>> r = math_answer("no answer here, just words that end in 7", {"answer": "7"})
    >>> r, r.reason
    (0.0, 'unreadable')
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
            return Scored(0.0, UNREADABLE)
        completion = ANSWER_OPEN + inner + ANSWER_CLOSE
    ok, reason = match_verdict(str(gold), completion, float_rounding, fallback, strict, plain_numbers,
                               relation_as_set, bounded=bounded, question=_question(example, context),
                               rounded_decimals=rounded_decimals, unmarked=unmarked, open_box=unterminated_box)
    return 1.0 if ok else Scored(0.0, reason) if reason else 0.0


math_answer.reasons = (UNREADABLE,)


_WARM_UP = [("\\frac{1}{2}", "\\boxed{0.5}"), ("(x+1)^2", "\\boxed{x^2+2x+1}"), ("x > 3", "\\boxed{2^x > 8}"),
            ("f(x)", "\\boxed{f(y)}"), ("\\sum_{k=1}^{n} k^2", "\\boxed{\\sum_{k=0}^{n} k}"),
            ("7", "we get **7** at the end")]


def warm_up() -> None:
    """Pay the first-use costs (SymPy's caches, math-verify's LaTeX grammar) on fixed inputs: the
    sandbox zygote calls it once, so that forked workers start warm and a first answer does not
    run into the per-item deadline."""
    for gold, completion in _WARM_UP:
        math_answer(completion, {"answer": gold}, bounded=True, unmarked="last_value")  # the reasons it may give, each counted as reward/math_answer/<reason>
