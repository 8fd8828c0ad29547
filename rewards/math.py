"""The math-answer reward: extract the final answer, parse it safely, compare it with the gold.

Roles: the *gold* is ``example["answer"]`` (a bare answer, LaTeX, or a worked solution with a
``\\boxed{}``); the *prediction* is the completion. Both go through the same extraction and parser;
where a policy is asymmetric it says so below.

Extraction (`answer_candidates`, `read_answer`): text up to the last ``</think>`` is reasoning,
never the answer (nothing after it: no answer). Then, first match wins:
1. the last ``<answer>...</answer>`` (R1-Zero template); a ``\\boxed{}`` inside it wins; nothing
   outside the tags is ever read when the tags are there;
2. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), or a later "the final answer is ...",
   "the answer is ...", "answer: ..." phrase (up to the end of the sentence). Boxes *adjacent* to
   the last one (separated only by punctuation, spacing, or at most four words including "and" /
   "or") are merged into one list; earlier, non-adjacent boxes are ignored;
3. a text that is one math segment (``$...$``, ``\\(...\\)``, ...) or a bare answer (no prose, no ``$``).
Otherwise the text is unmarked prose: the last math segment (adjacent ones merged) or the last
number, whichever comes later; if neither reads, math-verify's parser (see below). No answer
scores 0.

Normalisation (`rewards.mathparse.normalize`): ``\\left``/``\\right``, spacing commands, ``\\dfrac``,
``\\text{}`` wrappers, trailing unit words after a number ("125 miles", ``15\\mbox{ cm}^2``) and
degree marks (``90^\\circ`` == 90) are dropped; thousands separators (``7,425,000``, ``1 000``,
``14{,}916``) are removed, a single decimal comma (``1,22``) is a decimal point; unicode minus signs,
``\\times``/``\\cdot`` and full-width digits are mapped to ASCII.

Percent policy: a percent sign on one side only accepts either the same number or the number
divided by 100 on the other (``28\\%`` matches ``28`` and ``0.28``).

Comparison (`equivalent`): exact rational arithmetic first. When a decimal literal is involved, the
tolerance follows the precision written: with ``d`` decimals (fewest on either side) the values
must agree to within half a unit in the ``d``-th place (``3.14`` matches ``\\pi``, ``0.333`` matches
``1/3``, ``5.001`` does not match ``5``), and a prediction with one decimal never approximates an
exact gold (``0.7`` is not ``2/3``, while gold ``3.1`` accepts ``\\pi``); the ``float_rounding``
keyword instead rounds both to that many decimals. Irrational constants are compared at 50 significant digits with a *relative*
tolerance of 1e-30, so ``1/2004!`` and ``1/2006!`` differ. Expressions with symbols are compared by
exact expansion, then by evaluation at three points where every symbol is positive (``\\sqrt{1/n}``
equals ``1/\\sqrt{n}``), then by `sympy.simplify` under the sandbox deadline. Different variable
names are different (``f(x)`` is not ``f(y)``). Tuples are ordered, sets and bare lists are not
(a tuple equals a set only when written in the set's sorted order); intervals compare endpoints and
closedness; ``a \\pm b`` is the set ``{a+b, a-b}``; matrices compare element-wise. Equations:
``x = 2`` matches ``2`` when the left side is only symbols (``k = 1``, ``f(x) = 1``, ``(p,q) = (3,2)``);
two equations match when one side-difference is a constant multiple of the other; a chain
``a = b = c`` is judged by its last part; ``\\approx`` keeps the value before it. Inequalities match
when their normalised forms are positive multiples; a chain ``a < x < b`` is the interval ``(a, b)``.
Several different answers where the gold has one (hedging: "3 or 4", ``\\pm`` for a single value)
score 0; an empty answer scores 0.

math-verify: when a marked answer does not parse with our parser, or nothing in unmarked prose
does, math-verify's ``parse`` reads it (``fallback=True``, the default; ``fallback=False`` uses our
parser alone). It runs only inside the worker sandbox: input limits first (nesting depth, big binomials,
6000 characters), a size check on what it returns (exponents, factorials, integer size), and its
result goes through our comparison, never through math-verify's ``verify``. Its plain-number
target passes to SymPy's ``parse_expr`` only strings its regular expression limits to digits,
spaces and ``. + - * / ^ ( )``: no names, so no code beyond arithmetic can run.
"""

from __future__ import annotations

import logging
import re

import sympy

from rewards.mathparse import (
    MAX_CHARS,
    Answer,
    Interval,
    Matrix,
    ParseError,
    PlusMinus,
    Relation,
    Seq,
    Text,
    TooBig,
    Union,
    parse_answer,
)

MAX_SCAN_CHARS = 20_000  # only the tail of a completion is searched for the final answer

# ------------------------------------------------------------------ extraction


def _braced_spans(text: str, commands=("\\boxed", "\\fbox")) -> list[tuple[int, int, str]]:
    """(start, end, content) of every ``\\boxed{...}`` whose braces balance; one linear scan."""
    spans = []
    i = 0
    n = len(text)
    while True:
        hits = [(text.find(c + "{", i), c) for c in commands]
        hits = [(h, c) for h, c in hits if h != -1]
        if not hits:
            return spans
        start, cmd = min(hits)
        j = start + len(cmd) + 1
        depth = 1
        while j < n and depth:
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            j += 1
        if depth:
            return spans
        spans.append((start, j, text[start + len(cmd) + 1 : j - 1]))
        i = start + len(cmd) + 1  # boxes nested inside boxes are found too; the outermost wins below


_GAP_NOISE = re.compile(r"\\text\s*\{([^{}]*)\}|\\(?:quad|qquad|[,;:! ])|\$|\\[()\[\]]|[\s,;.]")


def _adjacent(gap: str) -> bool:
    words = _GAP_NOISE.sub(lambda m: " " + (m.group(1) or "") + " ", gap).split()
    if not words or not re.search(r"[A-Za-z0-9]", " ".join(words)):
        return True
    if len(words) > 4:
        return False
    return any(w.lower() in ("and", "or") for w in words)


def _last_boxed(text: str) -> str | None:
    spans = _braced_spans(text)
    if not spans:
        return None
    outer = []  # drop boxes nested inside another box
    for s in spans:
        if outer and s[0] < outer[-1][1]:
            continue
        outer.append(s)
    group = [outer[-1]]
    for s in reversed(outer[:-1]):
        if _adjacent(text[s[1] : group[0][0]]):
            group.insert(0, s)
        else:
            break
    if len(group) == 1:
        return group[0][2]
    return ", ".join(g[2] for g in group)


_FINAL = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<![\d\\])\.(?:\s|$)|\n|\bI hope\b")
_NUMBER = re.compile(r"-?\\[dtc]?frac\s*\{\s*-?\d+\s*\}\s*\{\s*\d+\s*\}|-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*%)?")


def math_segments(text: str) -> list[str]:
    """Contents of the math segments of a text (see `_segment_spans`)."""
    return [body for _, _, body in _segment_spans(text)]


def _segment_spans(text: str) -> list[tuple[int, int, str]]:
    """Contents of ``$$..$$``, ``\\[..\\]``, ``$..$`` and ``\\(..\\)`` in order; one linear pass.

    Inline ``$..$`` and ``\\(..\\)`` do not span lines (as in Markdown).

    >>> math_segments("so $x=1$ and $$y = 2$$ or \\\\(z\\\\)")
    ['x=1', 'y = 2', 'z']
    """
    out = []
    i, n = 0, len(text)
    nxt = {"$": -2, "\\[": -2, "\\(": -2}  # next position of each opener, found lazily (linear)
    seen: dict[str, tuple[int, int]] = {}  # closer -> (searched from, found at): reused, so linear

    def find(key: str, start: int) -> int:
        if key in seen:
            frm, at = seen[key]
            if frm <= start and (at == -1 or at >= start):
                return at
        at = text.find(key, start)
        seen[key] = (start, at)
        return at

    while i < n:
        for key, pos in nxt.items():
            if pos != -1 and pos < i:
                nxt[key] = text.find(key, i)
        j = min((k for k in nxt.values() if k != -1), default=-1)
        if j == -1:
            break
        if text[j] == "$" and j > 0 and text[j - 1] == "\\":  # \$ is a dollar sign
            i = j + 1
            continue
        if text.startswith("$$", j):
            close, width, inline = find("$$", j + 2), 2, False
        elif text.startswith("$", j):
            close, width, inline = text.find("$", j + 1), 1, True
            while close != -1 and text[close - 1] == "\\":  # \$ inside is a dollar sign
                close = text.find("$", close + 1)
        elif text.startswith("\\[", j):
            close, width, inline = find("\\]", j + 2), 2, False
        else:
            close, width, inline = find("\\)", j + 2), 2, True
        if close == -1:
            i = j + width
            continue
        body = text[j + width : close]
        if inline and "\n" in body:
            i = j + width if text[j] != "$" else close  # the closing $ may open the next segment
            continue
        if body.strip():
            out.append((j, close + width, body.strip()))
        i = close + width
    return out


def _strip_delims(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    segs = math_segments(s)
    if len(segs) == 1 and s.startswith(("$", "\\(", "\\[")) and s.endswith(("$", "\\)", "\\]")):
        return segs[0]
    return s.strip()


def _last_number(text: str) -> str | None:
    m = None
    for m in _NUMBER.finditer(text):  # noqa: B007 (keeps the last match)
        pass
    return m.group().strip() if m else None


def answer_candidates(text: str, with_strength: bool = False) -> list:
    """Candidate answer strings, best first (see the module docstring for the order).

    >>> answer_candidates("<think>3+4 is 7</think><answer>7</answer>")
    ['7']
    >>> answer_candidates("so the area is \\\\boxed{\\\\frac{1}{2}}.")
    ['\\\\frac{1}{2}']
    >>> answer_candidates("\\\\boxed{1} and \\\\boxed{2}")
    ['1, 2']
    >>> answer_candidates("The final answer is $12$. I hope it is correct.")
    ['12']
    >>> answer_candidates("Final Answer: The volume of $ABCD$ is 120.", with_strength=True)
    [('The volume of $ABCD$ is 120', False), ('120', 'number'), ('ABCD', False)]
    """
    out = _candidates(text)
    return out if with_strength else [c for c, _ in out]


_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "frac", "text", "and", "infty", "pmatrix",
               "bmatrix", "begin", "end", "mbox", "mathrm", "cdot", "times", "left", "right", "quad", "circ", "pct",
               "percent", "dfrac", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "matrix", "array"}


def _is_prose(s: str) -> bool:
    """Two or more words (not math names), or any letter of a non-Latin, non-Greek script."""
    if any(ch.isalpha() and ord(ch) > 0x3FF for ch in s):
        return True
    return sum(1 for w in _PROSE_WORD.findall(s) if w.lower() not in _MATH_WORDS) >= 2


NUMBER = "number"  # candidate kind: a number picked out of prose (weakest)


def _is_bare(text: str) -> bool:
    """A bare answer: short, no prose, no math delimiters (``-3``, ``x^2+1``, ``\\frac{1}{2}``)."""
    text = text.strip()
    return 0 < len(text) <= MAX_CHARS and "$" not in text.replace("\\$", "") and not _is_prose(text) and (
        "\\boxed" not in text and "<answer>" not in text and _FINAL.search(text) is None
        and "\\[" not in text and "\\(" not in text
    )


def _candidates(text: str) -> list[tuple[str, bool]]:
    a = text.rfind("<answer>")
    if a != -1:
        end = text.find("</answer>", a)
        inner = text[a + len("<answer>") : end if end != -1 else len(text)]
        if len(inner) > MAX_SCAN_CHARS:
            return [(inner[:MAX_CHARS + 1], True)]  # over the limit: the parser refuses it
    if len(text) > MAX_SCAN_CHARS:
        text = text[-MAX_SCAN_CHARS:]
    if a != -1:
        boxed = _last_boxed(inner)
        strong = _strip_delims(boxed if boxed is not None else inner)
        if not strong:
            return []
        out = [(strong, True)]
        if boxed is None:  # prose inside the tags: a final-answer phrase, or its only number
            out += [(c, True) for c, _ in _candidates(strong)[:1] if c != strong and _FINAL.search(strong)]
            numbers = _NUMBER.findall(strong)
            if len(numbers) == 1 and numbers[0].strip() != strong:
                out.append((numbers[0].strip(), True))
        return out
    strong = None
    from_phrase = False
    boxed_at = -1
    spans = _braced_spans(text)
    if spans:
        boxed_at = spans[-1][0]
        strong = _last_boxed(text)
    m = None
    for m in _FINAL.finditer(text):  # noqa: B007 (keeps the last match)
        pass
    if m is not None and m.start() > boxed_at:
        rest = text[m.end() :]
        e = _SENTENCE_END.search(rest)
        phrase = _strip_delims(rest[: e.start()] if e else rest)
        if phrase:
            strong = phrase
            from_phrase = True
    if strong is not None:
        strong = strong.strip()
        if not from_phrase:
            return [(strong, True)] if strong else []
        out = [(strong, not _is_prose(strong))] if strong else []
        return out + [c for c in _weak(strong) if c[0] != strong]
    out = []
    stripped = text.strip()
    segs = math_segments(stripped)
    if len(segs) == 1 and _strip_delims(stripped) == segs[0]:
        return [(segs[0], True)]
    if _is_bare(stripped):
        out.append((stripped, True))
    return out + _weak(text)


def _weak(text: str) -> list[tuple[str, bool]]:
    """Unmarked text: the last math segment (adjacent ones merged, like boxes) and the last number,
    whichever comes later first."""
    spans = _segment_spans(text)
    seg = num = None
    seg_end = num_end = -1
    if spans:
        group = [spans[-1]]
        for sp in reversed(spans[:-1]):
            if _adjacent(text[sp[1] : group[0][0]]) and text[sp[1] : group[0][0]].strip():
                group.insert(0, sp)
            else:
                break
        seg = ", ".join(g[2] for g in group)
        seg_end = group[-1][1]
    m = None
    for m in _NUMBER.finditer(text):  # noqa: B007 (keeps the last match)
        pass
    if m is not None:
        num, num_end = m.group().strip(), m.end()
    ordered = [(seg, seg_end, False), (num, num_end, NUMBER)]
    ordered.sort(key=lambda x: -x[1])
    return [(c, kind) for c, _, kind in ordered if c]


def extract_answer(text: str) -> str | None:
    """The best candidate answer in a completion or a gold string, or None.

    >>> extract_answer("<think>3+4 is 7</think><answer>7</answer>")
    '7'
    >>> extract_answer("a long text without any marked answer " * 3) is None
    True
    """
    c = answer_candidates(text)
    return c[0] if c else None


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


def _after_think(text: str) -> str:
    """The thinking block is never the answer (the prompt may have opened it)."""
    close = text.rfind("</think>")
    return text[close + len("</think>") :] if close != -1 else text


def read_answer(text: str, fallback: bool = True, plain_numbers: bool = True):
    """The answer in a text: marked candidates with our parser; for a tagged or bare answer that
    does not parse, math-verify's LaTeX parser on it (``fallback``); for unmarked prose, our weak
    candidates, then math-verify's parse of the text. None if nothing reads; False when an input
    limit was hit.
    """
    text = _after_think(text)
    if not text.strip():
        return None
    cands = _candidates(text)
    for c, strong in cands:
        if strong is True:
            a = _parse(c)
            if a is not None:
                return a
    marked = "<answer>" in text or _is_bare(text)  # the tagged or bare answer is the whole answer
    use_mv = fallback and _mv_available()
    if marked:  # math-verify may read it as LaTeX, but never pick a number out of it
        return _mv_answer("$" + cands[0][0] + "$", False) if (use_mv and cands) else None
    for c, kind in cands:  # unmarked text: our reading of it first ...
        if kind is True or (kind == NUMBER and not plain_numbers):
            continue
        a = _parse(c)
        if a is not None:
            return a
    return _mv_answer(text, plain_numbers) if use_mv else None  # ... then math-verify's


# ------------------------------------------------------------------ comparison


class _Ctx:
    def __init__(self, gold: Answer, pred: Answer, float_rounding: int | None, strict: bool = True):
        self.decimals = [d for d in (gold.decimals, pred.decimals) if d is not None]
        # a one-decimal prediction is no approximation of an exact gold (0.7 for 2/3)
        self.coarse_guess = gold.decimals is None and pred.decimals is not None and pred.decimals < 2
        self.float_rounding = float_rounding
        self.strict = strict
        self.percent = gold.percent != pred.percent


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
            and not v.parts[0].free_symbols and not v.parts[1].free_symbols):
        return v.parts[1]  # "1/2 = 10/9": a computation, judged by its result
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


def _points(symbols):
    syms = sorted(symbols, key=lambda s: s.name)
    return [
        {s: sympy.Rational(37 * k + 61 * i + 50, 100) for i, s in enumerate(syms)}
        for k in (1, 2, 3)
    ]


def _num(expr, prec=50):
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


def _numbers_equal(g, p, ctx: _Ctx) -> bool:
    """Two constant expressions (no free symbols)."""
    if g == p:
        return True
    if g.is_infinite or p.is_infinite:
        return g == p
    if ctx.decimals or ctx.float_rounding is not None:
        if ctx.decimals and ctx.float_rounding is None:
            if ctx.coarse_guess:
                return False
            d = min(ctx.decimals)
        elif ctx.decimals:
            d = ctx.float_rounding
        else:
            d = None
        if d is not None:
            gv, pv = _num(g, 60), _num(p, 60)
            if gv is None or pv is None or isinstance(gv, complex) or isinstance(pv, complex):
                return False
            gr, pr = sympy.Rational(str(gv)), sympy.Rational(str(pv))
            if ctx.float_rounding is not None:
                return _round(gr, d) == _round(pr, d)
            return abs(gr - pr) <= sympy.Rational(1, 2) * sympy.Rational(1, 10**d) * (1 + sympy.Rational(1, 10**9))
    if g.is_Rational and p.is_Rational:
        return False
    gv, pv = _num(g), _num(p)
    if gv is None or pv is None:
        return sympy.simplify(g - p) == 0
    if isinstance(gv, complex) or isinstance(pv, complex):
        return abs(complex(gv) - complex(pv)) <= 1e-12 * max(abs(complex(gv)), 1e-300)
    scale = max(abs(gv), abs(pv))
    if scale == 0:
        return True
    return abs(gv - pv) <= scale * sympy.Float("1e-30", 50)


def _exprs_equal(g, p, ctx: _Ctx) -> bool:
    if g == p:
        return True
    if ctx.percent and g.is_number and p.is_number and any(
        _numbers_equal(g, q, _no_percent(ctx)) for q in (p, p * 100, p / 100)
    ):
        return True
    free = g.free_symbols | p.free_symbols
    if not free:
        return _numbers_equal(g, p, ctx)
    if not ctx.strict and len(g.free_symbols) == 1 and len(p.free_symbols) == 1 and g.free_symbols != p.free_symbols:
        p = p.xreplace({next(iter(p.free_symbols)): next(iter(g.free_symbols))})  # f(x) ~ f(y) when not strict
        free = g.free_symbols
    if any(s.name == "ELLIPSIS" for s in free):
        return sympy.expand(g - p) == 0
    try:
        if sympy.expand(g - p) == 0:
            return True
    except (TypeError, ValueError, RecursionError):
        pass
    if g.has(sympy.Sum, sympy.Product, sympy.Integral) or p.has(sympy.Sum, sympy.Product, sympy.Integral):
        return False  # no numeric probing of unevaluated sums: expansion decided
    checked = 0
    for point in _points(free):
        gv, pv = _num(g.xreplace(point), 30), _num(p.xreplace(point), 30)
        if gv is None or pv is None:
            continue
        if isinstance(gv, complex) or isinstance(pv, complex):
            if abs(complex(gv) - complex(pv)) > 1e-15 * max(abs(complex(gv)), 1):
                return False
        elif abs(gv - pv) > sympy.Float("1e-20", 30) * max(abs(gv), abs(pv), 1):
            if ctx.decimals and abs(gv - pv) <= 10 ** (-min(ctx.decimals)):
                pass
            else:
                return False
        checked += 1
    if checked >= 2:
        return True
    if sympy.count_ops(g) + sympy.count_ops(p) > 80:
        return False
    return sympy.simplify(g - p) == 0


def _no_percent(ctx):
    c = _Ctx.__new__(_Ctx)
    c.decimals, c.float_rounding, c.percent, c.strict = ctx.decimals, ctx.float_rounding, False, ctx.strict
    c.coarse_guess = ctx.coarse_guess
    return c


def _relation_form(r: Relation):
    """(f, op) with the relation meaning ``f op 0``, op in {'=', '<', '<=', '!='}."""
    (op,), (a, b) = r.ops, r.parts
    if op in (">", ">="):
        return b - a, op.replace(">", "<")
    return a - b, op


def _proportional(f1, f2, positive: bool) -> bool:
    if f1 == 0 or f2 == 0:
        return f1 == f2
    free = f1.free_symbols | f2.free_symbols
    ratios = []
    for point in _points(free):
        a, b = _num(f1.xreplace(point), 30), _num(f2.xreplace(point), 30)
        if a is None or b is None or isinstance(a, complex) or isinstance(b, complex) or b == 0:
            continue
        ratios.append(a / b)
    if len(ratios) < 2:
        return False
    r0 = ratios[0]
    if positive and r0 <= 0:
        return False
    return all(abs(r - r0) <= sympy.Float("1e-20", 30) * max(abs(r0), 1) for r in ratios)


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
    return _proportional(fg, fp, positive=og in ("<", "<="))


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
        return _exprs_equal(g, p, ctx)
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
        gm = _as_matrix(g)
        pm = _as_matrix(p)
        if gm is None or pm is None or len(gm.rows) != len(pm.rows) or len(gm.rows[0]) != len(pm.rows[0]):
            return False
        return all(_values_equal(a, b, ctx) for r, s in zip(gm.rows, pm.rows) for a, b in zip(r, s))
    return False


def _as_matrix(v):
    if isinstance(v, Matrix):
        return v
    if isinstance(v, Seq) and v.kind == "tuple" and len(v.items) == 1 and isinstance(v.items[0], Matrix):
        return v.items[0]
    return None


def equivalent(gold: Answer, pred: Answer, float_rounding: int | None = None, strict: bool = True) -> bool:
    """Whether a parsed prediction matches a parsed gold (see the module docstring for the policy).

    >>> equivalent(parse_answer("\\\\frac{1}{2}"), parse_answer("0.5"))
    True
    >>> equivalent(parse_answer("1-\\\\frac{1}{e}"), parse_answer("1+\\\\frac{1}{e}"))
    False
    >>> equivalent(parse_answer("x \\\\geq 5"), parse_answer("5 \\\\leq x"))
    True
    """
    ctx = _Ctx(gold, pred, float_rounding, strict)
    g, p = gold.value, pred.value
    # hedging: several values where the gold has one scores 0
    if isinstance(_canon(p), Seq) and _canon(p).kind in ("list", "set") and isinstance(g, sympy.Basic):
        return False
    return _values_equal(g, p, ctx)


# ------------------------------------------------------------------ math-verify fallback

MV_MAX_CHARS = 6000


def _mv_available() -> bool:
    """math-verify is used only inside a sandbox worker (deadline, memory limit), and only if installed."""
    from rewards import sandbox

    if not sandbox.IN_WORKER:
        return False
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _mv_answer(text: str, plain_numbers: bool = True):
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


_CHOICE = re.compile(r"^\s*\(?([A-E])[.):]\s")


def _choice_letter(v):
    """The letter of a multiple-choice gold (``C``, ``\\text{(C)}``), else None."""
    name = v.text.upper() if isinstance(v, Text) else (v.name if isinstance(v, sympy.Symbol) else "")
    return name if len(name) == 1 and name in "ABCDE" else None


def answers_match(gold_text: str, pred_text: str, float_rounding: int | None = None, fallback: bool = True,
                  strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True) -> bool:
    """Extract, parse and compare. The core of `math_answer`, usable on its own.

    >>> answers_match("7", "<think>3+4 is 7</think><answer>7</answer>")
    True
    >>> answers_match("$\\\\frac{1}{2^{99}}$", "$\\\\frac{1}{2^{98}}$")
    False
    """
    if not gold_text.strip() or not pred_text.strip():
        return False
    gold_c, pred_c = _candidates(_after_think(gold_text)), _candidates(_after_think(pred_text))
    if gold_c and pred_c and gold_c[0][1] is True and pred_c[0][1] is True and (
        " ".join(gold_c[0][0].split()) == " ".join(pred_c[0][0].split())
    ):
        return True  # the same answer, written the same way (even if our parser cannot read it)
    gold = read_answer(gold_text, fallback, plain_numbers)
    if not gold:
        return False
    choice = _CHOICE.match(pred_text)
    if choice and _choice_letter(gold.value) is not None:
        return choice.group(1) == _choice_letter(gold.value)
    pred = read_answer(pred_text, fallback, plain_numbers)
    if not pred:
        return False
    if not relation_as_set and isinstance(pred.value, Relation) and isinstance(gold.value, (Interval, Union)):
        return False
    try:
        return equivalent(gold, pred, float_rounding, strict)
    except (TypeError, ValueError, AttributeError, RecursionError, ZeroDivisionError):
        return False


def math_answer(completion: str, example: dict, float_rounding: int | None = None, fallback: bool = True,
                strict: bool = True, plain_numbers: bool = True, relation_as_set: bool = True,
                answer_tag: bool = False, **context) -> float:
    """1.0 when the completion's final answer equals the gold ``example["answer"]``, else 0.0.

    ``float_rounding``: compare decimals after rounding both sides to this many places (default:
    the tolerance follows the precision written). ``fallback``: let math-verify's parser read text
    that has no marked answer (no ``<answer>``, ``\\boxed``, "final answer is" or bare answer).
    ``strict=False``: a lone variable may be renamed (``f(x)`` matches ``f(y)``).
    ``plain_numbers=False``: in unmarked text only LaTeX counts, not a bare last number.
    ``relation_as_set=False``: a predicted relation (``-2 \\le x \\le 7``) does not match a gold
    set (``[-2, 7]``); the other way round always matches.
    ``answer_tag=True``: R1-Zero's accuracy reward: only the last closed ``<answer>...</answer>``
    is read, and a completion without one scores 0 however right its bare text is.

    >>> math_answer("<think>3+4 is 7</think><answer>7</answer>", {"answer": "7"})
    1.0
    >>> math_answer("<think>3+4 is 7</think><answer>8</answer>", {"answer": "7"})
    0.0
    >>> math_answer("no answer here, just some words that go on and on and on and on and on", {"answer": "7"})
    0.0
    >>> math_answer(" 7", {"answer": "7"}), math_answer(" 7", {"answer": "7"}, answer_tag=True)
    (1.0, 0.0)
    >>> math_answer("... so \\\\boxed{\\\\dfrac{14}{3}}", {"answer": "$\\\\frac{14}{3}$"})
    1.0
    """
    gold = example.get("answer")
    if gold is None or not isinstance(completion, str):
        return 0.0
    if answer_tag:
        start = completion.rfind("<answer>")
        end = completion.find("</answer>", start + 1) if start != -1 else -1
        if end == -1:
            return 0.0
        completion = completion[start : end + len("</answer>")]
    ok = answers_match(str(gold), completion, float_rounding, fallback, strict, plain_numbers, relation_as_set)
    return 1.0 if ok else 0.0
