"""LaTeX commands in the bounded parser: fractions, roots, binomials, functions, constants,
decorations, and matrix environments. Each function reads from a `rewards.math.parser` parser
state ``p`` (its tokens and position) and returns a value.
"""

from __future__ import annotations

import sympy

from rewards.math.build import FUNCS, GREEK, GREEK_CMDS, check_pow, combine, sym
from rewards.math.values import MAX_FACTORIAL, Matrix, ParseError, PlusMinus, TooBig


def command(p):
    _, text = p.take()
    name = text[1:]
    if name == "frac" or name == "binom":
        num = frac_arg(p)
        den = frac_arg(p)
        if name == "binom":
            if not (num.is_Integer and den.is_Integer and 0 <= den <= num <= MAX_FACTORIAL):
                raise TooBig("binomial out of range")
            return sympy.binomial(num, den)
        return combine(num, den, "/")
    if name == "sqrt":
        index = None
        if p.at("["):
            p.take()
            index = p.sum_()
            p.expect("]")
        arg = frac_arg(p)
        if index is None:
            return sympy.sqrt(arg)
        check_pow(arg, index)
        return sympy.root(arg, index)
    if name in FUNCS:
        return p.apply(FUNCS[name])
    if name == "pi":
        return sympy.pi
    if name in ("infty", "infin"):
        return sympy.oo
    if name in ("e", "mathrm"):
        return sympy.E
    if name in GREEK:
        return sym(name)
    if name in ("ldots", "cdots", "dots"):
        return sympy.Symbol("ELLIPSIS")
    if name == "begin":
        return environment(p)
    if name in ("overline", "overrightarrow", "vec", "hat", "bar", "widehat", "angle", "triangle"):
        if p.at("{"):
            inner = p.group()
        else:
            inner = p.primary()
        return sympy.Symbol(f"{name}({inner})", real=True)
    if name in ("forall", "exists", "implies", "iff", "Rightarrow", "Leftrightarrow"):
        raise ParseError("quantified statement")
    if name in ("end", "sum", "prod", "int", "lim", "to", "cup", "cap", "setminus", "bmod", "pmod", "mod"):
        raise ParseError(f"unsupported command {text}")
    if len(name) > 12:
        raise ParseError("long command")
    return sym(name)  # an unknown command names a constant (\\zzz)

def frac_arg(p):
    if p.at("{"):
        value = p.group()
    else:
        kind, text = p.take()
        if kind == "num":  # \frac12
            if len(text) > 1 and "." not in text:
                p.toks.insert(p.pos, ("num", text[1:]))
                text = text[0]
            value = p.number(text)
        elif kind == "word":
            value = sym(text[0])
            if len(text) > 1:
                p.toks.insert(p.pos, ("word", text[1:]))
        elif kind == "cmd":
            p.pos -= 1
            value = p.primary()
        else:
            raise ParseError("bad \\frac argument")
    if not isinstance(value, (sympy.Basic, PlusMinus)):
        raise ParseError("fraction of a non-expression")
    return value
def environment(p):
    p.expect("{")
    env = p.take()[1]
    p.expect("}")
    if env not in ("pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "array", "smallmatrix"):
        raise ParseError(f"environment {env}")
    if env == "array" and p.at("{"):  # column spec
        depth = 0
        while True:
            t = p.take()[1]
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
                if depth == 0:
                    break
            elif t == "":
                raise ParseError("bad array")
    rows, row = [], []
    p.enter()
    while True:
        if p.at(r"\end"):
            p.take()
            p.expect("{")
            p.take()
            p.expect("}")
            break
        if p.at(r"\rowbreak"):
            p.take()
            if row:
                rows.append(tuple(row))
            row = []
            continue
        if p.at("&"):
            p.take()
            continue
        if p.peek()[0] == "eof":
            raise ParseError("unclosed matrix")
        row.append(p.sum_())
    p.leave()
    if row:
        rows.append(tuple(row))
    if not rows or len({len(r) for r in rows}) != 1:
        raise ParseError("ragged matrix")
    if env == "vmatrix":  # |a b; c d| is a determinant
        if len(rows) != len(rows[0]) or len(rows) > 4 or not all(isinstance(x, sympy.Basic) for r in rows for x in r):
            raise ParseError("determinant of a non-square or large matrix")
        return sympy.Matrix(rows).det()
    return Matrix(tuple(rows))


def apply(p, fn):
    """A function name applied to its argument, with an optional power first (``\\sin^2 x``)."""
    power = None
    if p.at("^"):  # \sin^2 x
        p.take()
        power = p.exponent()
    p.enter()
    if p.at("("):
        arg = p.bracketed()
    elif p.at("{"):
        arg = p.group()
    else:
        arg = _bare_argument(p)
    p.leave()
    if not isinstance(arg, sympy.Basic):
        raise ParseError("function of a non-expression")
    value = fn(arg)
    if power is not None:
        check_pow(value, power)
        value = value ** power
    return value


def _bare_argument(p):
    """A function name without brackets applies to the product of the number and letters right
    after it (``\\sin 2x`` is sin(2x)), up to an operator or another function."""
    arg = p.power()
    while (p.peek()[0] == "word" and len(p.peek()[1]) == 1) or p.at(*GREEK_CMDS):
        factor = p.power()
        arg = combine(arg, factor, "*")
    return arg
