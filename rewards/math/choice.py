"""What the question tells the grader: multiple-choice letters and questions that ask for a percent.

Rules (each in one sentence):
- A gold that is a single capital letter A-J, or a letter in ``\\text{}``, or a lower-case letter
  when the question is multiple-choice, is an option letter; then only the predicted option
  letter counts, and its case does not matter.
- A question is multiple-choice when it lists options ``(A)`` and ``(B)`` (or ``A.`` / ``A)`` and
  ``B.`` / ``B)`` at line starts), or the example carries a list of choices.
- The predicted letter is the marked answer (box, tags, "the answer is") when that is one letter
  (``C``, ``(C)``, ``C) Canberra``); otherwise a capital letter in a closing phrase of prose
  ("the correct option is (C)", "I choose C", "it's C"), the last such phrase winning, or a
  capital letter that opens the completion ("D. because ..."); two letters joined by "or"/"and"
  are no answer.
- A question asks for a percent when it says "what percent(age)", "how many percent" or "as / in
  (a) percent(age)"; then a gold without a % sign may be matched as a percent (see
  `rewards.math.numbers`).
"""

from __future__ import annotations

import re

import sympy

from rewards.math.extract import candidates
from rewards.math.values import Text

_LETTERS = "ABCDEFGHIJ"
_OPTION_A = re.compile(r"\(A\)|(?:^|\n)\s*A[.):]\s")
_OPTION_B = re.compile(r"\(B\)|(?:^|\n)\s*B[.):]\s")
_PERCENT_ASKED = re.compile(r"\b(?:what|which|how\s+many)\s+(?:percent|percentage)\b"
                            r"|\b(?:as|in|into)\s+(?:a\s+)?(?:percent|percentage)\b", re.IGNORECASE)
_MARKED_LETTER = re.compile(r"\(?([A-Ja-j])\)?[.:]?|\(?([A-J])[.):]\s+(.*)", re.DOTALL)
_HEDGE = re.compile(r"\b(?:or|and)\s+\(?[A-J]\b")
_PROSE_LETTER = re.compile(
    r"(?:\b(?:answer|option|choice|r\u00e9ponse)\s*(?:is|would\s+be|est|:|=)\s*"
    r"(?:(?:for\s+sure|definitely|clearly|certainly)\s+)?(?:option\s+|choice\s+)?"
    r"|\b(?:choose|select|pick)\s+(?:option\s+|choice\s+)?|\bit(?:'s|\s+is)\s+)"
    r"(?:\*\*)?\(?([A-J])\)?(?:\*\*)?(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def is_multiple_choice(question: str | None) -> bool:
    """Options (A) and (B) are listed in the question."""
    return bool(question) and bool(_OPTION_A.search(question)) and bool(_OPTION_B.search(question))


def options_text(options) -> str:
    """A list or mapping of choices written as ``(A) ... (B) ...`` (so `is_multiple_choice` sees it)."""
    items = list(options.values()) if isinstance(options, dict) else list(options)
    return " ".join(f"({_LETTERS[k]}) {v}" for k, v in enumerate(items[: len(_LETTERS)]))


def asks_percent(question: str | None) -> bool:
    """The question asks for a percent ("what percent", "as a percentage")."""
    return bool(question) and bool(_PERCENT_ASKED.search(question))


def gold_letter(value, question: str | None) -> str | None:
    """The option letter a parsed gold stands for, in capitals, or None."""
    if isinstance(value, Text):
        name = value.text.strip("() ").upper()
        return name if len(name) == 1 and name in _LETTERS else None
    if isinstance(value, sympy.Symbol) and len(value.name) == 1:
        if value.name in _LETTERS:
            return value.name
        if value.name.upper() in _LETTERS and is_multiple_choice(question):
            return value.name.upper()
    return None


def predicted_letter(text: str) -> str | None:
    """The option letter a completion chooses, in capitals, or None (see the module docstring).

    >>> predicted_letter("The correct option is (C).")
    'C'
    >>> predicted_letter("\\\\boxed{c}")
    'C'
    >>> predicted_letter("I think the answer is A or B.") is None
    True
    """
    cands = candidates(text)
    if cands and cands[0][1] is True:
        s = _TEXT_WRAP.sub(lambda m: m.group(1), cands[0][0]).replace("$", "").strip()
        m = _MARKED_LETTER.fullmatch(s)
        if m and not (m.group(3) and _HEDGE.search(m.group(3))):
            return (m.group(1) or m.group(2)).upper()
    tail = text[-2000:]
    start = re.match(r"\s*\(?([A-J])(?:[.):\u3002]|(?=[^\x00-\x7f]))", tail) if len(text) <= 2000 else None
    found = None
    for m in _PROSE_LETTER.finditer(tail):
        if m.group(1).isupper() or tail[m.start(1) - 1] == "(":  # a lower-case letter only as "(c)"
            found = m
    if found is not None:
        hedged = _HEDGE.match(tail[found.end():].lstrip(" )*"))
        return None if hedged else found.group(1).upper()
    return start.group(1) if start else None
