"""What a parsed answer is: limits, errors, and the value structures the comparison works on.

Values are SymPy expressions or one of the small frozen structures below (tuples, sets, bare
lists, ratios, intervals, unions, matrices, relations, plus-minus pairs, text). An `Answer` wraps
a value with what the comparison needs to know about how it was written.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CHARS = 1000  # longest answer string we parse
MAX_DEPTH = 40  # deepest nesting of brackets / commands
MAX_DIGITS = 400  # longest number literal
MAX_EXPONENT = 2000  # |n| in a^n with numeric a, n (and digits of the result, below)
MAX_RESULT_DIGITS = 5000
MAX_SYMBOLIC_EXPONENT = 10_000  # |n| in x^n with a symbolic base (never expanded; see rewards.math.numbers)
MAX_FACTORIAL = 500


class ParseError(ValueError):
    """The text is not an answer this parser understands (or is over a limit)."""


class TooBig(ParseError):
    """An input limit was hit."""


# ------------------------------------------------------------------ value structures


@dataclass(frozen=True)
class Seq:
    """An ordered tuple ``(a, b)``, an unordered set ``\\{a, b\\}`` or a bare list ``a, b``."""

    kind: str  # "tuple" | "set" | "list" | "ratio"
    items: tuple


@dataclass(frozen=True)
class Interval:
    lo: object
    hi: object
    left_closed: bool
    right_closed: bool


@dataclass(frozen=True)
class Union:
    parts: tuple


@dataclass(frozen=True)
class Matrix:
    rows: tuple  # tuple of tuples


@dataclass(frozen=True)
class Relation:
    """A chain ``a op b op c`` (``=``, ``<``, ``<=``, ``>``, ``>=``, ``!=``)."""

    ops: tuple
    parts: tuple


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class PlusMinus:
    """``a \\pm b``: the two values a+b and a-b."""

    center: object
    delta: object


@dataclass
class Answer:
    value: object
    decimals: int | None = None  # fewest decimal places among decimal literals, None if none
    percent: bool = False
    source: str = ""


