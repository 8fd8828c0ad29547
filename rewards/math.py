"""The math-answer reward (first cut: integers, fractions and decimals)."""

from __future__ import annotations

import re
from fractions import Fraction

MAX_ANSWER_CHARS = 2000


def _last_braced(text: str, command: str) -> str | None:
    """Content of the last ``command{...}`` with nested braces (linear scan)."""
    start = text.rfind(command + "{")
    while start != -1:
        i = start + len(command) + 1
        depth = 1
        j = i
        while j < len(text) and depth:
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1]
        start = text.rfind(command + "{", 0, start)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion or gold string.

    >>> extract_answer("<think>3+4 is 7</think><answer>7</answer>")
    '7'
    >>> extract_answer("so \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    """
    if "<answer>" in text:
        start = text.rfind("<answer>") + len("<answer>")
        end = text.find("</answer>", start)
        inner = text[start:] if end == -1 else text[start:end]
        boxed = _last_braced(inner, "\\boxed")
        return (boxed if boxed is not None else inner).strip() or None
    boxed = _last_braced(text, "\\boxed")
    if boxed is not None:
        return boxed.strip() or None
    m = None
    for m in re.finditer(r"answer is[:\s]*", text):
        pass
    if m is not None:
        return text[m.end():].strip().rstrip(".") or None
    return text.strip() or None


_NUM = re.compile(r"^([+-]?)(\d+(?:\.\d+)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)(\d+)\s*/\s*(\d+)$")
_TEXFRAC = re.compile(r"^([+-]?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$")


def parse_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").replace("\u2212", "-").replace(",", "").replace(" ", "")
    if len(s) > 200:
        return None
    if m := _NUM.match(s):
        v = Fraction(m.group(2))
        return -v if m.group(1) == "-" else v
    if (m := _FRAC.match(s)) or (m := _TEXFRAC.match(s)):
        if int(m.group(3)) == 0:
            return None
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return -v if m.group(1) == "-" else v
    return None


def math_answer(completion: str, example: dict, **context) -> float:
    """1.0 when the completion's final answer equals the gold ``example["answer"]``, else 0.0.

    >>> math_answer("<think>3+4 is 7</think><answer>7</answer>", {"answer": "7"})
    1.0
    >>> math_answer("<think>3+4 is 7</think><answer>8</answer>", {"answer": "7"})
    0.0
    >>> math_answer("no answer here", {"answer": "7"})
    0.0
    """
    gold = extract_answer(str(example.get("answer", "")))
    pred = extract_answer(completion[-MAX_ANSWER_CHARS * 10:])
    if gold is None or pred is None:
        return 0.0
    g, p = parse_number(gold), parse_number(pred)
    if g is None or p is None:
        return float(gold.strip() == pred.strip() and gold.strip() != "")
    return float(g == p)
