"""Countdown (TinyZero's task): the answer is an arithmetic expression that uses each given number exactly once and
evaluates to the target. The expression is evaluated by `evaluate_arithmetic`, a small parser that
accepts only non-negative integers, ``+ - * /`` and parentheses, with exact fractions; it never
calls `eval`.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

from rewards.format import answer_block

MAX_EXPR_CHARS = 400
MAX_DEPTH = 50
MAX_DIGITS = 12


class ArithmeticError_(ValueError):
    """The text is not a plain arithmetic expression."""


def _tokens(expr: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "0123456789":
            j = i
            while j < n and expr[j] in "0123456789":
                j += 1
            if j - i > MAX_DIGITS:
                raise ArithmeticError_("number too long")
            out.append(expr[i:j])
            i = j
        elif c in "+-*/()":
            out.append(c)
            i += 1
        elif c in "×x":
            out.append("*")
            i += 1
        elif c == "÷":
            out.append("/")
            i += 1
        else:
            raise ArithmeticError_(f"character {c!r} is not allowed")
    return out


def evaluate_arithmetic(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an expression of integers, ``+ - * /`` and parentheses, and the numbers used.

    >>> evaluate_arithmetic("(25 - 5) * 3 / 4")
    (Fraction(15, 1), [25, 5, 3, 4])
    >>> evaluate_arithmetic("__import__('os')")
    Traceback (most recent call last):
    ...
    rewards.countdown.ArithmeticError_: character '_' is not allowed
    """
    if len(expr) > MAX_EXPR_CHARS:
        raise ArithmeticError_("expression too long")
    toks = _tokens(expr)
    pos = 0
    used: list[int] = []

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def expr_(depth):
        value = term(depth)
        while peek() in ("+", "-"):
            op = take()
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth):
        value = factor(depth)
        while peek() in ("*", "/"):
            op = take()
            rhs = factor(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ArithmeticError_("division by zero")
                value = value / rhs
        return value

    def factor(depth):
        if depth > MAX_DEPTH:
            raise ArithmeticError_("nested too deeply")
        t = peek()
        if t is None:
            raise ArithmeticError_("unexpected end")
        if t == "(":
            take()
            value = expr_(depth + 1)
            if peek() != ")":
                raise ArithmeticError_("missing ')'")
            take()
            return value
        if t == "-":  # unary minus on a parenthesised group or number
            take()
            return -factor(depth + 1)
        if t.isdigit():
            take()
            used.append(int(t))
            return Fraction(int(t))
        raise ArithmeticError_(f"unexpected {t!r}")

    value = expr_(0)
    if pos != len(toks):
        raise ArithmeticError_(f"unexpected {toks[pos]!r}")
    return value, used


def _answer_text(completion: str) -> str | None:
    text = answer_block(completion)
    if text is None:
        return None
    text = text.strip()
    if "=" in text:  # "(a+b)*c = 24": judge the left-hand side
        text = text.split("=", 1)[0].strip()
    return text


def countdown(completion: str, example: dict, format_score: float = 0.1, **context) -> float:
    """1.0 if ``<answer>`` holds an expression using each of ``example["numbers"]`` exactly once
    that equals ``example["target"]``; ``format_score`` (TinyZero's 0.1) for a well-formed but
    wrong expression; 0.0 without an answer.

    >>> ex = {"target": 24, "numbers": [4, 6, 1]}
    >>> countdown("<think>...</think><answer>4 * 6 * 1</answer>", ex)
    1.0
    >>> countdown("<answer>4 * 6</answer>", ex)   # 1 unused
    0.1
    >>> countdown("<answer>__import__('os').system('x')</answer>", ex)
    0.1
    >>> countdown("4*6*1", ex)
    0.0
    """
    text = _answer_text(completion)
    if text is None:
        return 0.0
    try:
        value, used = evaluate_arithmetic(text)
    except ArithmeticError_:
        return format_score
    if Counter(used) != Counter(int(x) for x in example["numbers"]):
        return format_score
    return 1.0 if value == Fraction(int(example["target"])) else format_score
