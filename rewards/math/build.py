"""Building SymPy values from parse nodes, with the size checks that keep every step bounded.

Every power is checked before SymPy builds it (`check_pow`: exponent at most ``MAX_EXPONENT``,
result at most ``MAX_RESULT_DIGITS`` digits), every factorial before it is evaluated
(``MAX_FACTORIAL``); arithmetic on structures (matrices, ``\\pm`` pairs) is spelled out here.
"""

from __future__ import annotations

import sympy

from rewards.math.values import (
    MAX_EXPONENT,
    MAX_FACTORIAL,
    MAX_RESULT_DIGITS,
    MAX_SYMBOLIC_EXPONENT,
    Interval,
    Matrix,
    ParseError,
    PlusMinus,
    TooBig,
)

FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "abs": sympy.Abs, "exp": sympy.exp, "ln": sympy.log, "log": sympy.log, "lg": lambda x: sympy.log(x, 10),
}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
GREEK_CMDS = tuple("\\" + name for name in sorted(GREEK))
RELOPS = {"=": "=", "==": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!="}
PROSE_3 = {"the", "and", "not", "get", "are", "was", "for", "but", "has", "its", "our", "you", "all", "any",
            "one", "two", "six", "ten", "yes", "can", "may", "now", "see", "let", "put", "use", "way", "thu"}


def sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True)


def check_pow(base, exp):
    if exp.is_Number and base.is_Number:
        e = abs(exp)
        if e > MAX_EXPONENT:
            raise TooBig("exponent too large")
        b = abs(base)
        if b > 1 and e * sympy.log(b, 10).evalf(5) > MAX_RESULT_DIGITS:
            raise TooBig("power too large")
    elif exp.is_Number and abs(exp) > (MAX_SYMBOLIC_EXPONENT if exp.is_Integer else MAX_EXPONENT):
        raise TooBig("exponent too large")  # (x-a)^6000 stays a power: never expanded, evaluated at points
    elif exp.is_Number and abs(exp) > MAX_EXPONENT and any(  # SymPy distributes (2x)^n: 2^n must stay small
        abs(n.p) * n.q > 1 and abs(exp) * sympy.log(abs(n.p) * n.q, 10).evalf(5) > MAX_RESULT_DIGITS
        for n in base.atoms(sympy.Rational)
    ):
        raise TooBig("power too large")
    elif exp.is_number and not exp.is_Number:
        try:
            if abs(complex(exp.evalf(15))) > MAX_EXPONENT:  # complex exponents too (e^{i\pi/2})
                raise TooBig("exponent too large")
        except (TypeError, ValueError):
            raise ParseError("exponent without a value") from None



def symbol_only(v) -> bool:
    return isinstance(v, (sympy.Symbol, sympy.core.function.AppliedUndef))


def fail(msg):
    """Raise a ParseError (usable inside an expression)."""
    raise ParseError(msg)


def neg(v):
    if isinstance(v, sympy.Basic):
        return -v
    if isinstance(v, PlusMinus):
        return PlusMinus(-v.center, v.delta)
    if isinstance(v, Interval):
        raise ParseError("negated interval")
    raise ParseError("negation of a non-expression")


def combine(a, b, op):
    if isinstance(a, Matrix) and isinstance(b, Matrix) and op in "+-":
        if len(a.rows) != len(b.rows) or len(a.rows[0]) != len(b.rows[0]):
            raise ParseError("matrix shapes differ")
        return Matrix(tuple(tuple(x + y if op == "+" else x - y for x, y in zip(r, s)) for r, s in zip(a.rows, b.rows)))
    if isinstance(a, Matrix) and isinstance(b, Matrix) and op == "*":
        m = sympy.Matrix(a.rows) * sympy.Matrix(b.rows) if len(a.rows[0]) == len(b.rows) else fail("shapes")
        return Matrix(tuple(tuple(m.row(i)) for i in range(m.rows)))
    if isinstance(a, PlusMinus) and isinstance(b, sympy.Basic):  # (c \pm d) / 4
        if op in "*/":
            return PlusMinus(combine(a.center, b, op), combine(a.delta, b, op))
        return PlusMinus(combine(a.center, b, op), a.delta)
    if isinstance(b, PlusMinus) and isinstance(a, sympy.Basic) and op in "+*":  # 1 + (\pm d)
        return PlusMinus(combine(a, b.center, op), b.delta if op == "+" else a * b.delta)
    if not isinstance(a, sympy.Basic) or not isinstance(b, sympy.Basic):
        raise ParseError("arithmetic on a non-expression")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ParseError("division by zero")
    return a / b


def factorial(v):
    if not isinstance(v, sympy.Basic):
        raise ParseError("factorial of a non-expression")
    if v.is_Integer:
        if v < 0 or v > MAX_FACTORIAL:
            raise TooBig("factorial too large")
        return sympy.factorial(v)
    if v.is_number:
        raise ParseError("factorial of a non-integer")
    return sympy.factorial(v)


def from_base(digits: str, base: int):
    if not 2 <= base <= 36:
        raise ParseError("bad base")
    try:
        return sympy.Integer(int(digits, base))
    except ValueError:
        raise ParseError("digit out of range for base") from None


