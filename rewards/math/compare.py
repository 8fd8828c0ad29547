"""Comparison rules: when a parsed prediction is the same answer as a parsed gold.

`equivalent` dispatches on the value structures (`rewards.math.values`); numbers and expressions
go to `rewards.math.numbers`. Each rule is stated next to the code that applies it.
"""

from __future__ import annotations

import sympy

from rewards.math.numbers import Ctx, exprs_equal, num, points, proportional
from rewards.math.values import Answer, Interval, Matrix, PlusMinus, Relation, Seq, Text, Union


def _is_symbolish(v) -> bool:
    """Only symbols (no numbers): a name like x, f(x), |AB|, A:B, (p, q), NO/BO."""
    if isinstance(v, Seq):
        return all(_is_symbolish(i) for i in v.items)
    if not isinstance(v, sympy.Basic):
        return False
    if isinstance(v, sympy.Symbol):
        return True
    if isinstance(v, sympy.core.function.AppliedUndef):
        return all(isinstance(a, sympy.Symbol) for a in v.args)
    if isinstance(v, (sympy.Mul, sympy.Abs)) or (isinstance(v, sympy.Pow) and v.exp == -1):
        return all(_is_symbolish(a) or a == -1 for a in v.args)
    return False


def _canon(v):
    """Policies that rewrite a value before comparison."""
    if isinstance(v, Relation) and all(op == "=" for op in v.ops) and len(v.parts) > 2:
        return _canon(v.parts[-1])  # a chain a = b = c is judged by its last value
    if isinstance(v, PlusMinus):
        return Seq("set", (v.center + v.delta, v.center - v.delta))
    if (isinstance(v, Relation) and v.ops == ("=",) and all(isinstance(x, sympy.Basic) for x in v.parts)
            and all(s.name == "ELLIPSIS" for s in v.parts[0].free_symbols) and not v.parts[1].free_symbols):
        return v.parts[1]  # "1/2 = 10/9", "2*7 + 3*6 + ... = 81": a computation, judged by its result
    if isinstance(v, Relation) and len(v.parts) == 3 and v.ops[0] == v.ops[1] and v.ops[0] in ("<", "<="):
        lo, mid, hi = v.parts
        if (isinstance(mid, sympy.Abs) and isinstance(mid.args[0], sympy.Symbol) and isinstance(lo, sympy.Basic)
                and lo.is_number and lo.is_nonnegative):  # a <= |z| <= b  is  [-b, -a] U [a, b]
            closed = v.ops[0] == "<="
            return Union((Interval(-hi, -lo, closed, closed), Interval(lo, hi, closed, closed)))
        if _is_symbolish(mid):
            return Interval(lo, hi, v.ops[0] == "<=", v.ops[1] == "<=")
    if isinstance(v, Relation) and len(v.parts) == 3 and v.ops[0] == v.ops[1] and v.ops[0] in (">", ">="):
        hi, mid, lo = v.parts
        if _is_symbolish(mid):
            return Interval(lo, hi, v.ops[0] == ">=", v.ops[1] == ">=")
    if isinstance(v, Seq) and v.kind in ("list", "set"):
        items = _group_assignments([_canon(i) for i in _expand_pm(v.items)])
        return Seq(v.kind, tuple(items))
    if isinstance(v, Seq):
        return Seq(v.kind, tuple(_canon(i) for i in v.items))
    return v


def _expand_pm(items) -> list:
    """In a list, ``x = a \\pm b`` stands for two values."""
    out = []
    for it in items:
        pair = _assignment(it)
        val = pair[1] if pair else it
        if isinstance(val, PlusMinus):
            for v in (val.center + val.delta, val.center - val.delta):
                out.append(Relation(("=",), (pair[0], v)) if pair else v)
        else:
            out.append(it)
    return out


def _assignment(v):
    if isinstance(v, Relation) and v.ops == ("=",) and _is_symbolish(v.parts[0]):
        return v.parts[0], v.parts[1]
    return None


def _group_assignments(items):
    """[p=5, q=2, p=7, q=2] -> [(5, 2), (7, 2)]; [x=1, y=2] stays a list of values [1, 2]."""
    pairs = [_assignment(i) for i in items]
    if not items or any(p is None for p in pairs):
        return [(_assignment(i)[1] if _assignment(i) else i) for i in items]
    names = [p[0] for p in pairs]
    k = len(names)
    for period in range(2, len(names)):
        if len(names) % period == 0 and len(set(names[:period])) == period and all(
            names[i] == names[i % period] for i in range(len(names))
        ):
            k = period
            break
    if k == len(names):
        return [p[1] for p in pairs]
    return [Seq("tuple", tuple(p[1] for p in pairs[i : i + k])) for i in range(0, len(pairs), k)]


def _relation_form(r: Relation):
    """(f, op) with the relation meaning ``f op 0``, op in {'=', '<', '<=', '!='}."""
    (op,), (a, b) = r.ops, r.parts
    if op in (">", ">="):
        return b - a, op.replace(">", "<")
    return a - b, op


def _relations_equal(g: Relation, p: Relation, ctx) -> bool:
    if len(g.parts) != 2 or len(p.parts) != 2:
        return len(g.parts) == len(p.parts) and g.ops == p.ops and all(
            _values_equal(a, b, ctx) for a, b in zip(g.parts, p.parts)
        )
    if not all(isinstance(x, sympy.Basic) for x in g.parts + p.parts):
        if g.ops == p.ops == ("=",):
            return _values_equal(g.parts[0], p.parts[0], ctx) and _values_equal(g.parts[1], p.parts[1], ctx)
        return False
    (fg, og), (fp, op) = _relation_form(g), _relation_form(p)
    if og != op:
        return False
    if og == "=" and g.parts[0] == p.parts[0] and _is_symbolish(g.parts[0]):
        return _values_equal(g.parts[1], p.parts[1], ctx)
    if og == "=" and _names_function(g.parts[0]) and _names_function(p.parts[0]):
        return _values_equal(g.parts[1], p.parts[1], ctx)  # y = E and f(x) = E: the same function
    if proportional(fg, fp, positive=og in ("<", "<=")):
        return True
    return og in ("<", "<=") and same_solution_set(fg, fp, og)


def same_solution_set(fg, fp, op: str) -> bool:
    """Two inequalities ``fg op 0`` and ``fp op 0`` in one and the same variable are equivalent when
    SymPy solves both over the reals to the same set (``2x > 4`` and ``x > 2``; ``2^x > 8`` and
    ``x > 3``); small expressions only (``MAX_SOLVE_OPS``), under the sandbox deadline."""
    free = fg.free_symbols | fp.free_symbols
    if len(free) != 1 or fg.free_symbols != fp.free_symbols or sympy.count_ops(fg) + sympy.count_ops(fp) > MAX_SOLVE_OPS:
        return False
    x = next(iter(free))
    grid = [{x: sympy.Rational(k, 4) * sign} for k in range(1, 41) for sign in (1, -1)]
    for point in points(free) + grid:  # a point where one holds and the other does not decides at once
        a, b = num(fg.xreplace(point), 30), num(fp.xreplace(point), 30)
        if a is None or b is None or isinstance(a, complex) or isinstance(b, complex):
            continue
        if (a < 0 or (op == "<=" and a == 0)) != (b < 0 or (op == "<=" and b == 0)):
            return False
    rel = sympy.Lt if op == "<" else sympy.Le
    try:
        sg = sympy.solveset(rel(fg, 0), x, domain=sympy.S.Reals)
        sp = sympy.solveset(rel(fp, 0), x, domain=sympy.S.Reals)
    except (NotImplementedError, TypeError, ValueError, RecursionError, AttributeError):
        return False
    if isinstance(sg, sympy.ConditionSet) or isinstance(sp, sympy.ConditionSet):
        return False
    return sg == sp


MAX_SOLVE_OPS = 40


def _names_function(v) -> bool:
    """``y`` or ``f(x)``: the left side of an equation that defines a function by its right side."""
    if isinstance(v, sympy.core.function.AppliedUndef):
        return len(v.args) == 1 and isinstance(v.args[0], sympy.Symbol)
    return v == sympy.Symbol("y", real=True)


def _relation_to_interval(r: Relation):
    if len(r.parts) != 2 or r.ops[0] not in ("<", "<=", ">", ">="):
        return None
    a, b = r.parts
    op = r.ops[0]
    if _is_symbolish(b) and not _is_symbolish(a):  # 5 >= x  ->  x <= 5
        a, b = b, a
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
    if not _is_symbolish(a):
        return None
    if op in ("<", "<="):
        return Interval(-sympy.oo, b, False, op == "<=")
    return Interval(b, sympy.oo, op == ">=", False)


def _match_unordered(gs, ps, ctx) -> bool:
    if len(gs) != len(ps):
        return False
    used = [False] * len(ps)
    for g in gs:
        for j, p in enumerate(ps):
            if not used[j] and _values_equal(g, p, ctx):
                used[j] = True
                break
        else:
            return False
    return True


def _match_as_sets(gs, ps, ctx) -> bool:
    """Every gold item is matched by some prediction item and vice versa (repeats do not count)."""
    if not gs or not ps or len(ps) > 4 * len(gs) + 4:
        return not gs and not ps
    return all(any(_values_equal(g, p, ctx) for p in ps) for g in gs) and all(
        any(_values_equal(g, p, ctx) for g in gs) for p in ps
    )


def _sort_key(v):
    try:
        return (0, float(v))
    except (TypeError, ValueError):
        return (1, str(v))


def _values_equal(g, p, ctx) -> bool:
    g, p = _canon(g), _canon(p)
    if isinstance(g, sympy.Basic) and isinstance(p, sympy.Basic):
        return exprs_equal(g, p, ctx)
    if _is_clock(g) or _is_clock(p):
        return _clocks_equal(g, p)
    if isinstance(g, Text) or isinstance(p, Text):
        gt = g.text if isinstance(g, Text) else (str(g).lower() if isinstance(g, sympy.Symbol) else None)
        pt = p.text if isinstance(p, Text) else (str(p).lower() if isinstance(p, sympy.Symbol) else None)
        return gt is not None and pt is not None and gt == pt
    if isinstance(g, Relation) and isinstance(p, Relation):
        return _relations_equal(g, p, ctx)
    if isinstance(g, Relation) or isinstance(p, Relation):
        rel, other = (g, p) if isinstance(g, Relation) else (p, g)
        if rel.ops == ("=",) and _is_symbolish(rel.parts[0]):
            return _values_equal(rel.parts[1], other, ctx) if rel is g else _values_equal(other, rel.parts[1], ctx)
        as_interval = _relation_to_interval(rel)
        if as_interval is not None and isinstance(other, (Interval, Union)):
            return _values_equal(as_interval, other, ctx)
        return False
    if isinstance(g, Seq) and g.kind == "tuple" and len(g.items) == 2 and isinstance(p, Interval):
        g = Interval(g.items[0], g.items[1], False, False)
    if isinstance(p, Seq) and p.kind == "tuple" and len(p.items) == 2 and isinstance(g, Interval):
        p = Interval(p.items[0], p.items[1], False, False)
    if isinstance(g, Interval) and isinstance(p, Interval):
        return (
            g.left_closed == p.left_closed
            and g.right_closed == p.right_closed
            and _values_equal(g.lo, p.lo, ctx)
            and _values_equal(g.hi, p.hi, ctx)
        )
    if isinstance(g, (Union, Interval)) and isinstance(p, (Union, Interval)):
        gp = g.parts if isinstance(g, Union) else (g,)
        pp = p.parts if isinstance(p, Union) else (p,)
        return _match_unordered(list(gp), list(pp), ctx)
    if isinstance(g, Seq) and isinstance(p, Seq):
        if g.kind == "ratio" or p.kind == "ratio":
            return g.kind == p.kind and len(g.items) == len(p.items) and all(
                _values_equal(a, b, ctx) for a, b in zip(g.items, p.items)
            )
        if g.kind == "tuple" and p.kind == "tuple":
            return len(g.items) == len(p.items) and all(_values_equal(a, b, ctx) for a, b in zip(g.items, p.items))
        if "tuple" in (g.kind, p.kind) and "set" in (g.kind, p.kind):
            t, s = (g, p) if g.kind == "tuple" else (p, g)
            ordered = sorted(s.items, key=_sort_key)
            pairs = zip(t.items, ordered) if t is g else zip(ordered, t.items)
            return len(t.items) == len(s.items) and all(_values_equal(a, b, ctx) for a, b in pairs)
        return _match_as_sets(list(g.items), list(p.items), ctx)
    if isinstance(g, Matrix) or isinstance(p, Matrix):
        shape = _shape(g if isinstance(g, Matrix) else p)
        gm, pm = _as_matrix(g, shape), _as_matrix(p, shape)
        if gm is None or pm is None or _shape(gm) != _shape(pm):
            return False
        return all(_values_equal(a, b, ctx) for r, s in zip(gm.rows, pm.rows) for a, b in zip(r, s))
    return False


def _is_clock(v) -> bool:
    return isinstance(v, Text) and v.text.startswith("time ")


def _clock(v) -> str | None:
    """A time of day as ``HH:MM``: a marked time, or a ratio ``h:m`` read on the 24-hour clock."""
    if _is_clock(v):
        return v.text[len("time "):]
    if isinstance(v, Seq) and v.kind == "ratio" and len(v.items) == 2 and all(
        isinstance(x, sympy.Integer) for x in v.items
    ) and 0 <= v.items[0] <= 23 and 0 <= v.items[1] <= 59:
        return f"{int(v.items[0]):02d}:{int(v.items[1]):02d}"
    return None


def _clocks_equal(g, p) -> bool:
    """A time with an AM/PM marker equals the same time on the 24-hour clock (3:00 PM is 15:00)."""
    gc, pc = _clock(g), _clock(p)
    return gc is not None and gc == pc


def _shape(m: Matrix) -> tuple[int, int]:
    return len(m.rows), len(m.rows[0])


def _entries(v) -> tuple | None:
    """The entries of a list written ``(a, b)`` or ``[a, b]`` (read as a closed interval), else None."""
    if isinstance(v, Seq) and v.kind == "tuple":
        return v.items
    if isinstance(v, Interval) and v.left_closed and v.right_closed:
        return (v.lo, v.hi)
    return None


def _as_matrix(v, shape: tuple[int, int]):
    """A value as a matrix of the given shape, when it is one written another way.

    A one-column or one-row matrix equals a tuple or bracketed list of its entries in order, and a
    matrix equals a list of its row lists (``[[1, 2], [3, 4]]``); sets and bare lists never do.
    """
    if isinstance(v, Matrix):
        return v
    items = _entries(v)
    if items is None:
        return None
    if len(items) == 1 and isinstance(items[0], Matrix):
        return items[0]
    rows = [_entries(i) for i in items]
    if all(r is not None for r in rows) and len({len(r) for r in rows}) == 1 and shape == (len(rows), len(rows[0])):
        return Matrix(tuple(tuple(r) for r in rows))
    if not all(isinstance(i, sympy.Basic) for i in items):
        return None
    if shape == (len(items), 1):
        return Matrix(tuple((i,) for i in items))
    if shape == (1, len(items)):
        return Matrix((tuple(items),))
    return None


def equivalent(gold: Answer, pred: Answer, float_rounding: int | None = None, strict: bool = True,
               percent_question: bool = False, rounded_decimals: bool = False) -> bool:
    """Whether a parsed prediction matches a parsed gold (see the module docstring for the policy).

    >>> from rewards.math.parser import parse_answer
    >>> equivalent(parse_answer("\\\\frac{1}{2}"), parse_answer("0.5"))
    True
    >>> equivalent(parse_answer("1-\\\\frac{1}{e}"), parse_answer("1+\\\\frac{1}{e}"))
    False
    >>> equivalent(parse_answer("x \\\\geq 5"), parse_answer("5 \\\\leq x"))
    True
    """
    ctx = Ctx.of(gold, pred, float_rounding, strict, percent_question, rounded_decimals)
    g, p = gold.value, pred.value
    # hedging: several values where the gold has one scores 0
    if isinstance(_canon(p), Seq) and _canon(p).kind in ("list", "set") and isinstance(g, sympy.Basic):
        return False
    return _values_equal(g, p, ctx)


