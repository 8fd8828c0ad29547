"""The math-verify fallback: its parser reads what ours cannot, under our limits, never its verdict.

When a marked answer does not parse with our parser, or nothing in unmarked prose does, math-verify's
``parse`` reads it, but only when the caller runs under a deadline and a memory limit (a sandbox
worker: ``bounded=True``). Input limits come first (nesting depth, big binomials,
``MV_MAX_CHARS`` characters), then a size check on what it returns (exponents, factorials,
integer size); its result goes through our comparison, never through math-verify's ``verify``.
Its plain-number target passes to SymPy's ``parse_expr`` only strings its regular expression
limits to digits, spaces and ``. + - * / ^ ( )``: no names, so no code beyond arithmetic can run.
"""

from __future__ import annotations

import logging
import re

import sympy

from rewards.math.values import Answer, Interval, Matrix, ParseError, Relation, Seq, Text, TooBig, Union

MV_MAX_CHARS = 6000


def available() -> bool:
    """Whether math-verify is installed (the caller decides whether it may run: only under a deadline)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def mv_answer(text: str, plain_numbers: bool = True):
    """math-verify's parse of a text (LaTeX and plain-number targets), as an `Answer`, or None.

    Only reached inside the worker sandbox (per-item deadline, memory limit). The plain-number
    target hands math-verify's ``parse_expr`` strings that its own regular expression limits to
    digits, ``.``, spaces, ``+ - * / ^ ( )``: no names, so nothing but arithmetic can run, and the
    result is size-checked here before any evaluation.
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    except ImportError:
        return None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disable its alarm
    if len(text) > MV_MAX_CHARS:
        text = text[-MV_MAX_CHARS:]
    if not _mv_precheck(text):
        return None
    try:
        targets = [LatexExtractionConfig()] + ([ExprExtractionConfig()] if plain_numbers else [])
        out = parse(text, extraction_config=targets, parsing_timeout=None)
    except Exception:  # noqa: BLE001 - a failed parse is "no answer"
        return None
    if not out:
        return None
    try:
        value = _from_sympy(out[0], 0)
    except (ParseError, TypeError, ValueError, AttributeError, RecursionError):
        return None
    ans = Answer(value, source=str(out[-1]) if len(out) > 1 else "")
    src = ans.source
    m = re.findall(r"\d+\.(\d+)", src)
    if m:
        ans.decimals = min(len(x) for x in m)
    ans.percent = "%" in src
    return ans


_MV_RISKY = re.compile(r"\\binom\s*\{[^{}]*(?:\d{4,}|\^)|\\binom\s*\{[^{}]*\}\s*\{[^{}]*(?:\d{4,}|\^)"
                       r"|\^\s*\{?\s*\d{6,}|\d{5,}\s*!|\d{401}")


def _mv_precheck(text: str) -> bool:
    """Input limits before math-verify's parser runs: nesting depth, and constructs it would
    evaluate eagerly (big binomials; its powers and factorials stay unevaluated and are checked
    after parsing by `_check_size`)."""
    depth = worst = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            worst = max(worst, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return worst <= 40 and not _MV_RISKY.search(text)


def _check_size(e) -> None:
    for node in sympy.preorder_traversal(e):
        if isinstance(node, sympy.Pow) and node.exp.is_Number and abs(node.exp) > 2000:
            raise TooBig("exponent too large")
        if isinstance(node, sympy.Pow) and not node.exp.is_Number and node.exp.has(sympy.Pow):
            raise TooBig("power tower")
        if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.binomial, sympy.gamma)) and any(
            a.is_Number and abs(a) > 500 for a in node.args
        ):
            raise TooBig("factorial too large")
        if isinstance(node, sympy.Integer) and node.p.bit_length() > 20000:
            raise TooBig("integer too large")


def _from_sympy(v, depth):
    """math-verify's SymPy values in our value structures."""
    if depth > 30:
        raise ParseError("nested too deeply")
    if isinstance(v, str):
        t = v.strip()
        if not t:
            raise ParseError("empty")
        return Text(t.lower())
    if isinstance(v, sympy.matrices.expressions.MatrixExpr) and not isinstance(v, sympy.MatrixBase):
        v = v.as_explicit()
    if isinstance(v, sympy.MatrixBase):
        return Matrix(tuple(tuple(_from_sympy(x, depth + 1) for x in v.row(i)) for i in range(v.rows)))
    if isinstance(v, sympy.FiniteSet):
        return Seq("set", tuple(_from_sympy(x, depth + 1) for x in v.args))
    if isinstance(v, sympy.Tuple):
        return Seq("tuple", tuple(_from_sympy(x, depth + 1) for x in v.args))
    if isinstance(v, sympy.Interval):
        return Interval(_from_sympy(v.start, depth + 1), _from_sympy(v.end, depth + 1), not v.left_open, not v.right_open)
    if isinstance(v, sympy.Union):
        return Union(tuple(_from_sympy(x, depth + 1) for x in v.args))
    if isinstance(v, sympy.Eq):
        return Relation(("=",), (_from_sympy(v.lhs, depth + 1), _from_sympy(v.rhs, depth + 1)))
    if isinstance(v, sympy.Ne):
        return Relation(("!=",), (_from_sympy(v.lhs, depth + 1), _from_sympy(v.rhs, depth + 1)))
    if isinstance(v, sympy.core.relational.Relational):
        op = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}.get(v.rel_op)
        if op is None:
            raise ParseError("relation")
        return Relation((op,), (_from_sympy(v.lhs, depth + 1), _from_sympy(v.rhs, depth + 1)))
    if isinstance(v, sympy.Expr):
        _check_size(v)
        if v.has(sympy.Float):
            v = v.xreplace({f: sympy.Rational(str(f)) for f in v.atoms(sympy.Float)})
        return v
    raise ParseError(f"unsupported {type(v).__name__}")

