"""Numbers and expressions: when two SymPy values are the same answer.

Exact rational arithmetic first. A decimal literal against a value it does not equal exactly
fails, unless the caller allows rounded decimals (``rounded_decimals``: the tolerance then follows
the precision written, fewest decimals ``d`` on either side: agree to half a unit in the ``d``-th
place, and a one-decimal prediction never approximates an exact gold) or sets ``float_rounding``.
Irrational constants are compared at 50 significant digits with a relative tolerance of 1e-30.

Expressions with symbols (no numeric tolerance ever applies inside them): exact expansion (not
when a power above ``MAX_EXPANDED_POWER`` would have to be multiplied out), then evaluation at
sample points of both signs, with no assumption on the symbols: the two are equal when each is
real exactly where the other is and they agree wherever both are real (``sqrt(x^2)`` is not
``x``; ``log((x+1)/(1-x))`` is ``-log((1-x)/(x+1))``; ``(x-a)^6000`` is ``(a-x)^6000``), then
`sympy.simplify` when fewer than two points could decide (under the sandbox deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from rewards.math.values import Answer


@dataclass(frozen=True)
class Ctx:
    """What a comparison needs to know about how the two answers were written."""

    decimals: tuple = ()  # decimals written on either side (none for exact values)
    coarse_guess: bool = False  # a one-decimal prediction of an exact gold (0.7 for 2/3): never close enough
    float_rounding: int | None = None  # compare decimals after rounding to this many places
    rounded: bool = False  # a decimal may match an exact value it rounds to, at the precision written
    strict: bool = True  # a lone variable may not be renamed
    percent: bool = False  # a percent on one side only, or the question asks for a percent

    @classmethod
    def of(cls, gold: Answer, pred: Answer, float_rounding: int | None = None, strict: bool = True,
           percent_question: bool = False, rounded_decimals: bool = False) -> Ctx:
        return cls(
            decimals=tuple(d for d in (gold.decimals, pred.decimals) if d is not None),
            coarse_guess=gold.decimals is None and pred.decimals is not None and pred.decimals < 2,
            float_rounding=float_rounding,
            strict=strict,
            percent=gold.percent != pred.percent or percent_question,
            rounded=rounded_decimals,
        )


MAX_EXPANDED_POWER = 64  # no expansion multiplies out a power above this
_MAGNITUDES = [sympy.Rational(3, 7), sympy.Rational(13, 10), sympy.Rational(5, 11), sympy.Rational(29, 10),
               sympy.Rational(7, 19), sympy.Rational(53, 3), sympy.Rational(2, 13), sympy.Rational(41, 9),
               sympy.Rational(101, 7), sympy.Rational(11, 17)]


def points(symbols, n: int = 8):
    """Sample points: exact rationals of both signs (every sign pattern of up to three symbols),
    magnitudes below and above 1."""
    syms = sorted(symbols, key=lambda s: s.name)
    return [
        {s: _MAGNITUDES[(k + 3 * i) % len(_MAGNITUDES)] * (-1 if (k >> (i % 3)) & 1 else 1) for i, s in enumerate(syms)}
        for k in range(n)
    ]


def num(expr, prec=50):
    try:
        v = sympy.N(expr, prec)
    except (TypeError, ValueError, ZeroDivisionError, RecursionError):
        return None
    if v.has(sympy.zoo, sympy.nan) or not v.is_number:
        return None
    try:
        return complex(v) if not v.is_real else v
    except (TypeError, ValueError):
        return None


def _round(x: sympy.Rational, d: int) -> sympy.Rational:
    scale = sympy.Integer(10) ** d
    return sympy.floor(x * scale + sympy.Rational(1, 2)) / scale


def numbers_equal(g, p, ctx: Ctx) -> bool:
    """Two constant expressions (no free symbols)."""
    if g == p:
        return True
    if g.is_infinite or p.is_infinite:
        return g == p
    if ctx.decimals or ctx.float_rounding is not None:
        if ctx.decimals and ctx.float_rounding is None:
            if ctx.coarse_guess or not ctx.rounded:
                return False
            d = min(ctx.decimals)
        elif ctx.decimals:
            d = ctx.float_rounding
        else:
            d = None
        if d is not None:
            parts = _parts(g), _parts(p)  # a complex number: real and imaginary parts, each to the precision
            if None in parts:
                return False
            return all(_close(a, b, d, ctx.float_rounding is not None) for a, b in zip(*parts))
    if g.is_Rational and p.is_Rational:
        return False
    gv, pv = num(g), num(p)
    if gv is None or pv is None:
        return sympy.simplify(g - p) == 0
    if isinstance(gv, complex) or isinstance(pv, complex):
        return abs(complex(gv) - complex(pv)) <= 1e-12 * max(abs(complex(gv)), 1e-300)
    scale = max(abs(gv), abs(pv))
    if scale == 0:
        return True
    return abs(gv - pv) <= scale * sympy.Float("1e-30", 50)


def _parts(x):
    """(real, imaginary) parts of a constant as rationals, or None when it has no numeric value."""
    try:
        re_, im_ = (sympy.N(part, 60) for part in x.as_real_imag())
        return sympy.Rational(str(re_)), sympy.Rational(str(im_))
    except (TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError):
        return None


def _close(a, b, d: int, rounding: bool) -> bool:
    """Equal after rounding to ``d`` decimals, or (``rounding`` False) within half a unit in the ``d``-th place."""
    if rounding:
        return _round(a, d) == _round(b, d)
    return abs(a - b) <= sympy.Rational(1, 2) * sympy.Rational(1, 10**d) * (1 + sympy.Rational(1, 10**9))


def exprs_equal(g, p, ctx: Ctx) -> bool:
    if g == p:
        return True
    if ctx.percent and g.is_number and p.is_number and any(
        numbers_equal(g, q, _no_percent(ctx)) for q in (p, p * 100, p / 100)
    ):
        return True
    free = g.free_symbols | p.free_symbols
    if not free:
        return numbers_equal(g, p, ctx)
    if not ctx.strict and len(g.free_symbols) == 1 and len(p.free_symbols) == 1 and g.free_symbols != p.free_symbols:
        p = p.xreplace({next(iter(p.free_symbols)): next(iter(g.free_symbols))})  # f(x) ~ f(y) when not strict
        free = g.free_symbols
    if any(s.name == "ELLIPSIS" for s in free):
        return sympy.expand(g - p) == 0
    if not (_big_power(g) or _big_power(p)):
        try:
            if sympy.expand(g - p) == 0:
                return True
        except (TypeError, ValueError, RecursionError):
            pass
    if g.has(sympy.Sum, sympy.Product, sympy.Integral) or p.has(sympy.Sum, sympy.Product, sympy.Integral):
        return False  # no numeric probing of unevaluated sums: expansion decided
    verdict = agree_at_points(g, p, free)
    if verdict is not None:
        return verdict
    if sympy.count_ops(g) + sympy.count_ops(p) > 80 or _big_power(g) or _big_power(p):
        return False
    return sympy.simplify(g - p) == 0


def _real_if_tiny(v):
    """A complex value whose imaginary part is rounding noise (1e-25 relative) is real."""
    if isinstance(v, complex) and abs(v.imag) <= 1e-25 * max(abs(v), 1):
        return sympy.Float(v.real, 30)
    return v


def _big_power(e) -> bool:
    return any(isinstance(n, sympy.Pow) and n.exp.is_Integer and abs(n.exp) > MAX_EXPANDED_POWER
               for n in sympy.preorder_traversal(e))


def agree_at_points(g, p, free) -> bool | None:
    """False when at some sample point one side is real and the other is not, or both are real
    and differ (relative 1e-20, no other tolerance); True when at least two points have both real
    and equal; None when the points cannot decide (non-real or undefined values only)."""
    agree = 0
    for point in points(free):
        gv, pv = _real_if_tiny(num(g.xreplace(point), 30)), _real_if_tiny(num(p.xreplace(point), 30))
        if gv is None or pv is None:
            continue  # undefined at this point on one side: it cannot tell
        g_real, p_real = not isinstance(gv, complex), not isinstance(pv, complex)
        if g_real != p_real:
            return False  # defined as a real number on one side only: equal only under an assumption
        if g_real:
            if abs(gv - pv) > sympy.Float("1e-20", 30) * max(abs(gv), abs(pv), 1):
                return False
            agree += 1
    return True if agree >= 2 else None


def _no_percent(ctx: Ctx) -> Ctx:
    return replace(ctx, percent=False)


def proportional(f1, f2, positive: bool) -> bool:
    """``f1 = c * f2`` for one constant ``c`` (positive when ``positive``), at the sample points
    where both are real."""
    if f1 == 0 or f2 == 0:
        return f1 == f2
    free = f1.free_symbols | f2.free_symbols
    ratios = []
    for point in points(free):
        a, b = num(f1.xreplace(point), 30), num(f2.xreplace(point), 30)
        if a is None or b is None or isinstance(a, complex) or isinstance(b, complex) or b == 0:
            continue
        ratios.append(a / b)
    if len(ratios) < 2:
        return False
    r0 = ratios[0]
    if positive and r0 <= 0:
        return False
    return all(abs(r - r0) <= sympy.Float("1e-20", 30) * max(abs(r0), 1) for r in ratios)
