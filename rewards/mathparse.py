"""A small parser for final answers written in LaTeX or plain text, with hard size limits.

Model text is never evaluated as code: the answer is tokenised and parsed here by recursive descent,
and SymPy objects are built from the parse tree with SymPy constructors. Every input is checked
against limits first (length, nesting depth, number length, exponent and factorial size), so no
computer-algebra call ever sees ``9^{9^{9^9}}`` or ``10000!``.

`parse_answer` returns an `Answer`: the value plus what the comparison needs to know about how it
was written (decimals given, percent sign). Values are SymPy expressions or one of the small
structures below (tuples, sets, intervals, matrices, equations, relations, text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import sympy

MAX_CHARS = 1000  # longest answer string we parse
MAX_DEPTH = 40  # deepest nesting of brackets / commands
MAX_DIGITS = 400  # longest number literal
MAX_EXPONENT = 2000  # |n| in a^n with numeric a, n (and digits of the result, below)
MAX_RESULT_DIGITS = 5000
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


# ------------------------------------------------------------------ normalisation

_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # full-width ASCII -> ASCII
_CHARMAP = {
    **_FULLWIDTH,
    0x2212: "-", 0x2013: "-", 0x2014: "-", 0x2010: "-", 0x2011: "-", 0xFE63: "-",  # minus signs
    0x00D7: "*", 0x22C5: "*", 0x00B7: "*", 0x2217: "*",
    0x00F7: "/", 0x2215: "/",
    0x2264: r"\le ", 0x2265: r"\ge ", 0x2260: r"\ne ", 0x2248: r"\approx ",
    0x03C0: r"\pi ", 0x221E: r"\infty ", 0x221A: r"\sqrt", 0x00B1: r"\pm ",
    0x00B0: "", 0x2032: "'", 0x00A0: " ", 0x2009: " ", 0x202F: " ", 0x3000: " ",
    0x00B2: "^2", 0x00B3: "^3", 0x00B9: "^1",
}

_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "textnormal", "mbox", "mathrm", "mathbf", "mathit",
              "mathsf", "mathtt", "operatorname", "textsf", "texttt", "emph", "bold", "boldsymbol", "mathbb",
              "mathcal", "hbox")
_DROP = [r"\left", r"\right", r"\bigl", r"\bigr", r"\Bigl", r"\Bigr", r"\big", r"\Big", r"\displaystyle",
         r"\textstyle", r"\limits", r"\!", r"\,", r"\;", r"\:", r"\>", r"\qquad", r"\quad", r"\ ", "~", r"\$",
         r"\dollar", r"\mathclose", r"\mathopen", r"\middle"]


def normalize(s: str) -> str:
    """LaTeX noise out, symbols in a canonical spelling (the policy is documented in `rewards.math`).

    >>> normalize("\\\\left( \\\\dfrac{1}{2}, 3 \\\\right)")
    '( \\\\frac{1}{2}, 3 )'
    >>> normalize("\\u22121\\uff12")
    '-12'
    """
    s = s.translate(_CHARMAP)
    s = s.replace("\\\\", " \\rowbreak ") if "\\begin" in s else s.replace("\\\\", "\\")
    for cmd in ("dfrac", "tfrac", "cfrac"):
        s = s.replace("\\" + cmd, "\\frac")
    s = re.sub(r"(\d),\\!\s*(?=\d{3}(?!\d))", r"\1,", s)  # 11,\! 111 -> 11,111
    s = s.replace("\\!", "").replace("$", " ").rstrip("\\")
    s = s.replace("{,}", "").replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("\\div", "/").replace("\\ast", "*")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\circ", "").replace("\\degree", "")
    for d in _DROP:
        s = s.replace(d, " ")
    s = re.sub(r"\\(?:leq?slant|leqq|leq|le)(?![a-zA-Z])", " <= ", s)
    s = re.sub(r"\\(?:geq?slant|geqq|geq|ge)(?![a-zA-Z])", " >= ", s)
    s = re.sub(r"\\(?:neq|ne)(?![a-zA-Z])", " != ", s)
    s = re.sub(r"\\lt(?![a-zA-Z])", " < ", s)
    s = re.sub(r"\\gt(?![a-zA-Z])", " > ", s)
    s = re.sub(r"\s+", " ", s).strip()
    return s


# ------------------------------------------------------------------ tokenizer

_TOKEN = re.compile(
    r"""
    (?P<num>\d+(?:\.\d+)?|\.\d+)
  | (?P<cmd>\\[a-zA-Z]+|\\[{}|]|\\\\)
  | (?P<op><=|>=|!=|==|[-+*/^_!=<>(),;:\[\]{}|'%.?&])
  | (?P<word>[a-zA-Z]+)
  | (?P<ws>\s+)
    """,
    re.VERBOSE,
)


def tokenize(s: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    n = len(s)
    while pos < n:
        m = _TOKEN.match(s, pos)
        if m is None:
            raise ParseError(f"unexpected character {s[pos]!r}")
        kind = m.lastgroup
        text = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "num" and len(text) > MAX_DIGITS:
            raise TooBig("number literal too long")
        out.append((kind, text))
    return out


# ------------------------------------------------------------------ parser

_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log, "log": sympy.log, "lg": lambda x: sympy.log(x, 10),
}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_RELOPS = {"=": "=", "==": "=", "<": "<", ">": ">", "<=": "<=", ">=": ">=", "!=": "!="}
_PROSE_3 = {"the", "and", "not", "get", "are", "was", "for", "but", "has", "its", "our", "you", "all", "any",
            "one", "two", "six", "ten", "yes", "can", "may", "now", "see", "let", "put", "use", "way", "thu"}


def _sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True)


def _check_pow(base, exp):
    if exp.is_Number and base.is_Number:
        e = abs(exp)
        if e > MAX_EXPONENT:
            raise TooBig("exponent too large")
        b = abs(base)
        if b > 1 and e * sympy.log(b, 10).evalf(5) > MAX_RESULT_DIGITS:
            raise TooBig("power too large")
    elif exp.is_Number and abs(exp) > MAX_EXPONENT:
        raise TooBig("exponent too large")
    elif exp.is_number and not exp.is_Number:
        try:
            if abs(float(exp.evalf(15))) > MAX_EXPONENT:
                raise TooBig("exponent too large")
        except (TypeError, ValueError):
            raise ParseError("non-real exponent") from None


class _Parser:
    def __init__(self, tokens, info: Answer):
        self.toks = tokens
        self.pos = 0
        self.depth = 0
        self.info = info

    # -- helpers
    def peek(self, k=0):
        i = self.pos + k
        return self.toks[i] if i < len(self.toks) else ("eof", "")

    def take(self):
        t = self.peek()
        self.pos += 1
        return t

    def at(self, *texts):
        return self.peek()[1] in texts

    def expect(self, text):
        t = self.take()
        if t[1] != text:
            raise ParseError(f"expected {text!r}, got {t[1]!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TooBig("nested too deeply")

    def leave(self):
        self.depth -= 1

    # -- grammar
    def parse(self):
        value = self.top()
        if self.peek()[0] != "eof":
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return value

    def top(self):
        """Comma / semicolon separated list of relations (and word separators 'and'/'or')."""
        items = [self.relation()]
        while self.at(",", ";") or (self.peek()[0] == "word" and self.peek()[1] in ("and", "or")) or self._text_sep():
            self.take()
            if self.peek()[0] == "eof" or self.at(")", "]", r"\}", "}"):
                break
            while (self.peek()[0] == "word" and self.peek()[1] in ("and", "or")) or self._text_sep():
                self.take()
            items.append(self.relation())
        return items[0] if len(items) == 1 else Seq("list", tuple(items))

    def _text_sep(self):
        t = self.peek()
        return t[0] == "textsep"

    def relation(self):
        parts = [self.union()]
        ops = []
        while self.peek()[1] in _RELOPS or self.at(r"\approx", r"\in", r"\equiv", r"\sim"):
            op = self.take()[1]
            if op == r"\approx":  # "x = 1/3 \approx 0.33": keep what stands before the approximation
                rhs = self.union()
                if not ops and _symbol_only(parts[-1]):  # "x \approx 11": the value is 11
                    parts[-1] = rhs
                continue
            if op == r"\in":
                rhs = self.union()
                parts[-1] = rhs  # "x \in [a, b]": the set is the answer
                continue
            if op in (r"\equiv", r"\sim"):
                op = "="
            ops.append(_RELOPS.get(op, op))
            parts.append(self.union())
        if not ops:
            return parts[0]
        return Relation(tuple(ops), tuple(parts))

    def union(self):
        parts = [self.ratio()]
        while self.at(r"\cup"):
            self.take()
            parts.append(self.ratio())
        return parts[0] if len(parts) == 1 else Union(tuple(parts))

    def ratio(self):
        items = [self.sum_()]
        while self.at(":") :
            self.take()
            items.append(self.sum_())
        return items[0] if len(items) == 1 else Seq("ratio", tuple(items))

    def sum_(self):
        if self.at(r"\pm"):
            self.take()
            return PlusMinus(sympy.Integer(0), self.term())
        value = self.term()
        while self.at("+", "-", r"\pm", r"\mp"):
            op = self.take()[1]
            if self.at(r"\ldots", r"\cdots", r"\dots"):
                self.take()
                value = _combine(value, sympy.Symbol("ELLIPSIS"), "+")
                continue
            rhs = self.term()
            if op in (r"\pm", r"\mp"):
                if isinstance(value, PlusMinus):
                    raise ParseError("nested \\pm")
                value = PlusMinus(value, rhs)
            else:
                value = _combine(value, rhs, op)
        return value

    def term(self):
        value = self.unary()
        if isinstance(value, sympy.Integer) and self.at(r"\frac") and self.peek(-1)[0] == "num":
            frac = self.unary()  # 918\frac{1}{2}: a mixed number
            if isinstance(frac, sympy.Rational) and not isinstance(frac, sympy.Integer) and 0 < frac < 1:
                value = value + frac if value >= 0 else value - frac
            else:
                value = _combine(value, frac, "*")
        while True:
            if self.at("*", "/"):
                op = self.take()[1]
                value = _combine(value, self.unary(), op)
            elif self._starts_factor():
                value = _combine(value, self.power(), "*")
            else:
                return value

    def _starts_factor(self):
        kind, text = self.peek()
        if kind in ("num", "word"):
            return not (kind == "word" and text in ("and", "or"))
        if kind == "cmd":
            return text not in (r"\pm", r"\mp", r"\approx", r"\in", r"\cup", r"\cap", r"\}", r"\equiv", r"\sim",
                                r"\ldots", r"\cdots", r"\dots", r"\end", r"\rowbreak", r"\setminus", r"\to")
        return text in ("(", "{", r"\{")

    def unary(self):
        if self.at("-"):
            self.take()
            return _neg(self.unary())
        if self.at("+"):
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.at("^"):
            self.take()
            exp = self.exponent()
            if not isinstance(base, sympy.Basic) or not isinstance(exp, sympy.Basic):
                raise ParseError("power of a non-expression")
            _check_pow(base, exp)
            base = sympy.Pow(base, exp)
            while self.at("!"):
                self.take()
                base = _factorial(base)
        return base

    def exponent(self):
        if self.at("{"):
            return self.group()
        if self.at("-"):
            self.take()
            return _neg(self.exponent())
        kind, text = self.peek()
        if kind == "num":  # x^23 in LaTeX means x^2 * 3 only for braces-less single digit; keep the number
            self.take()
            return self.number(text)
        return self.postfix()

    def postfix(self):
        value = self.primary()
        while True:
            if self.at("!"):
                self.take()
                value = _factorial(value)
            elif self.at("%"):
                self.take()
                self.info.percent = True
            elif self.at("'"):
                self.take()
                if isinstance(value, sympy.Symbol):
                    value = sympy.Symbol(value.name + "'", real=True)
                else:
                    raise ParseError("prime on an expression")
            elif self.at("_"):
                self.take()
                sub = self.subscript_text()
                if isinstance(value, sympy.Integer) and sub.isdigit():  # 204_5: a base-5 numeral
                    value = _from_base(str(value), int(sub))
                elif isinstance(value, sympy.Symbol):
                    value = sympy.Symbol(f"{value.name}_{sub}", real=True)
                else:
                    raise ParseError("subscript on an expression")
            else:
                return value

    def subscript_text(self):
        if self.at("{"):
            self.take()
            parts = []
            depth = 1
            while True:
                kind, text = self.take()
                if kind == "eof":
                    raise ParseError("unclosed subscript")
                if text == "{":
                    depth += 1
                elif text == "}":
                    depth -= 1
                    if depth == 0:
                        break
                parts.append(text)
                if len(parts) > 50:
                    raise TooBig("subscript too long")
            return "".join(parts)
        kind, text = self.take()
        if kind in ("num", "word"):
            return text[0] if kind == "word" else text
        raise ParseError("bad subscript")

    def group(self):
        """``{ ... }`` holding one expression (or a list, read as a set: ``{1,3}``)."""
        self.expect("{")
        self.enter()
        value = self.top()
        self.expect("}")
        self.leave()
        if isinstance(value, Seq) and value.kind == "list":
            return Seq("set", value.items)
        return value

    def number(self, text):
        if "." in text:
            decimals = len(text.split(".", 1)[1])
            d = self.info.decimals
            self.info.decimals = decimals if d is None else min(d, decimals)
            return sympy.Rational(Fraction(text))
        return sympy.Integer(int(text))

    def primary(self):
        kind, text = self.peek()
        if kind == "num":
            self.take()
            return self.number(text)
        if kind == "word":
            return self.word()
        if kind == "textsep":
            raise ParseError("separator without a value")
        if text in ("(", "["):
            return self.bracketed()
        if text == "{":
            return self.group()
        if text == r"\{":
            return self.braced_set()
        if text == "|" or text in (r"\lvert", r"\vert", r"\|"):
            self.take()
            self.enter()
            inner = self.sum_()
            self.leave()
            if not (self.at("|") or self.at(r"\rvert", r"\vert", r"\|")):
                raise ParseError("unclosed |")
            self.take()
            return sympy.Abs(inner) if isinstance(inner, sympy.Basic) else _raise("abs of a non-expression")
        if kind == "cmd":
            return self.command()
        raise ParseError(f"unexpected {text!r}")

    def word(self):
        _, text = self.take()
        if text in _FUNCS:
            return self.apply(_FUNCS[text])
        if text == "sqrt":
            return self.apply(sympy.sqrt)
        if text == "pi":
            return sympy.pi
        if text in ("inf", "infty", "infinity"):
            return sympy.oo
        if len(text) == 1:
            value = _sym(text)
            if self.at("(") and self._looks_like_call():
                return self.call(text)
            return value
        if text.lower() in ("percent", "pct", "percentage"):
            self.info.percent = True
            return sympy.Integer(1)
        # a run of letters: implicit product of one-letter symbols ("xy", "abc"); a longer
        # word in the middle of an answer is prose, not algebra ("The answer is 42")
        if len(text) > 3 or (len(text) == 3 and text.lower() in _PROSE_3):
            raise ParseError("prose in the answer")
        value = sympy.Integer(1)
        for c in text:
            value = value * _sym(c)
        return value

    def _looks_like_call(self):
        # f(x), g(2): a single letter directly followed by a parenthesised single argument
        return self.peek(0)[1] == "(" and self.peek(2)[1] == ")" and self.peek(1)[0] in ("word", "num")

    def call(self, name):
        self.expect("(")
        arg = self.sum_()
        self.expect(")")
        return sympy.Function(name)(arg)

    def apply(self, fn):
        power = None
        if self.at("^"):  # \sin^2 x
            self.take()
            power = self.exponent()
        self.enter()
        if self.at("("):
            arg = self.bracketed()
        elif self.at("{"):
            arg = self.group()
        else:
            arg = self.power()
        self.leave()
        if not isinstance(arg, sympy.Basic):
            raise ParseError("function of a non-expression")
        value = fn(arg)
        if power is not None:
            _check_pow(value, power)
            value = value ** power
        return value

    def command(self):
        _, text = self.take()
        name = text[1:]
        if name == "frac" or name == "binom":
            num = self.frac_arg()
            den = self.frac_arg()
            if name == "binom":
                if not (num.is_Integer and den.is_Integer and 0 <= den <= num <= MAX_FACTORIAL):
                    raise TooBig("binomial out of range")
                return sympy.binomial(num, den)
            return _combine(num, den, "/")
        if name == "sqrt":
            index = None
            if self.at("["):
                self.take()
                index = self.sum_()
                self.expect("]")
            arg = self.frac_arg()
            if index is None:
                return sympy.sqrt(arg)
            _check_pow(arg, index)
            return sympy.root(arg, index)
        if name in _FUNCS:
            return self.apply(_FUNCS[name])
        if name == "pi":
            return sympy.pi
        if name in ("infty", "infin"):
            return sympy.oo
        if name in ("e", "mathrm"):
            return sympy.E
        if name in _GREEK:
            return _sym(name)
        if name in ("ldots", "cdots", "dots"):
            return sympy.Symbol("ELLIPSIS")
        if name == "begin":
            return self.environment()
        if name in ("overline", "overrightarrow", "vec", "hat", "bar", "widehat", "angle", "triangle"):
            if self.at("{"):
                inner = self.group()
            else:
                inner = self.primary()
            return sympy.Symbol(f"{name}({inner})", real=True)
        if name in ("forall", "exists", "implies", "iff", "Rightarrow", "Leftrightarrow"):
            raise ParseError("quantified statement")
        if name in ("end", "sum", "prod", "int", "lim", "to", "cup", "cap", "setminus"):
            raise ParseError(f"unsupported command {text}")
        if len(name) > 12:
            raise ParseError("long command")
        return _sym(name)  # an unknown command names a constant (\\zzz)

    def frac_arg(self):
        if self.at("{"):
            value = self.group()
        else:
            kind, text = self.take()
            if kind == "num":  # \frac12
                if len(text) > 1 and "." not in text:
                    self.toks.insert(self.pos, ("num", text[1:]))
                    text = text[0]
                value = self.number(text)
            elif kind == "word":
                value = _sym(text[0])
                if len(text) > 1:
                    self.toks.insert(self.pos, ("word", text[1:]))
            elif kind == "cmd":
                self.pos -= 1
                value = self.primary()
            else:
                raise ParseError("bad \\frac argument")
        if not isinstance(value, (sympy.Basic, PlusMinus)):
            raise ParseError("fraction of a non-expression")
        return value

    def bracketed(self):
        _, open_ = self.take()
        self.enter()
        items = [self.relation()]
        while self.at(",", ";"):
            self.take()
            items.append(self.relation())
        self.leave()
        kind, close = self.take()
        if close not in (")", "]"):
            raise ParseError("unclosed bracket")
        if len(items) == 1:
            if open_ == "(" and close == ")":
                return items[0]
            if open_ == "[" and close == "]":
                return items[0]
            raise ParseError("half-open bracket around one value")
        if len(items) == 2 and not (open_ == "(" and close == ")"):
            return Interval(items[0], items[1], open_ == "[", close == "]")
        if open_ == "(" and close == ")":
            value = Seq("tuple", tuple(items))
            if len(items) == 2:  # (a, b) is a pair or an open interval: decided when compared
                return value
            return value
        if open_ == "[" and close == "]":
            return Seq("tuple", tuple(items))
        raise ParseError("bad bracketed list")

    def braced_set(self):
        self.take()
        self.enter()
        if self.at(r"\}"):
            self.take()
            self.leave()
            return Seq("set", ())
        items = [self.relation()]
        while self.at(",", ";"):
            self.take()
            items.append(self.relation())
        self.leave()
        self.expect(r"\}")
        return Seq("set", tuple(items))

    def environment(self):
        self.expect("{")
        env = self.take()[1]
        self.expect("}")
        if env not in ("pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "array", "smallmatrix"):
            raise ParseError(f"environment {env}")
        if env == "array" and self.at("{"):  # column spec
            depth = 0
            while True:
                t = self.take()[1]
                if t == "{":
                    depth += 1
                elif t == "}":
                    depth -= 1
                    if depth == 0:
                        break
                elif t == "":
                    raise ParseError("bad array")
        rows, row = [], []
        self.enter()
        while True:
            if self.at(r"\end"):
                self.take()
                self.expect("{")
                self.take()
                self.expect("}")
                break
            if self.at(r"\rowbreak"):
                self.take()
                if row:
                    rows.append(tuple(row))
                row = []
                continue
            if self.at("&"):
                self.take()
                continue
            if self.peek()[0] == "eof":
                raise ParseError("unclosed matrix")
            row.append(self.sum_())
        self.leave()
        if row:
            rows.append(tuple(row))
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        return Matrix(tuple(rows))


def _symbol_only(v) -> bool:
    return isinstance(v, (sympy.Symbol, sympy.core.function.AppliedUndef))


def _raise(msg):
    raise ParseError(msg)


def _neg(v):
    if isinstance(v, sympy.Basic):
        return -v
    if isinstance(v, PlusMinus):
        return PlusMinus(-v.center, v.delta)
    if isinstance(v, Interval):
        raise ParseError("negated interval")
    raise ParseError("negation of a non-expression")


def _combine(a, b, op):
    if isinstance(a, Matrix) and isinstance(b, Matrix) and op in "+-":
        if len(a.rows) != len(b.rows) or len(a.rows[0]) != len(b.rows[0]):
            raise ParseError("matrix shapes differ")
        return Matrix(tuple(tuple(x + y if op == "+" else x - y for x, y in zip(r, s)) for r, s in zip(a.rows, b.rows)))
    if isinstance(a, Matrix) and isinstance(b, Matrix) and op == "*":
        m = sympy.Matrix(a.rows) * sympy.Matrix(b.rows) if len(a.rows[0]) == len(b.rows) else _raise("shapes")
        return Matrix(tuple(tuple(m.row(i)) for i in range(m.rows)))
    if isinstance(a, PlusMinus) and isinstance(b, sympy.Basic):  # (c \pm d) / 4
        if op in "*/":
            return PlusMinus(_combine(a.center, b, op), _combine(a.delta, b, op))
        return PlusMinus(_combine(a.center, b, op), a.delta)
    if isinstance(b, PlusMinus) and isinstance(a, sympy.Basic) and op in "+*":  # 1 + (\pm d)
        return PlusMinus(_combine(a, b.center, op), b.delta if op == "+" else a * b.delta)
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


def _factorial(v):
    if not isinstance(v, sympy.Basic):
        raise ParseError("factorial of a non-expression")
    if v.is_Integer:
        if v < 0 or v > MAX_FACTORIAL:
            raise TooBig("factorial too large")
        return sympy.factorial(v)
    if v.is_number:
        raise ParseError("factorial of a non-integer")
    return sympy.factorial(v)


def _from_base(digits: str, base: int):
    if not 2 <= base <= 36:
        raise ParseError("bad base")
    try:
        return sympy.Integer(int(digits, base))
    except ValueError:
        raise ParseError("digit out of range for base") from None


# ------------------------------------------------------------------ entry point

_TEXT_RE = re.compile(r"\\(" + "|".join(_TEXT_CMDS) + r")\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.])[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d,])")
_SPACE_THOUSANDS = re.compile(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_DEC_COMMA = re.compile(r"^(-?\d+),(\d+)$")


def _strip_text_commands(s: str) -> tuple[str, str | None]:
    """Replace ``\\text{...}`` by its content; unit words and connectives are handled by the caller.

    Returns the new string and, if the whole answer is one text command, its content.
    """
    whole = _TEXT_RE.fullmatch(s.strip())
    if whole:
        return whole.group(2), whole.group(2)
    return _TEXT_RE.sub(lambda m: " " + m.group(2) + " ", s), None


def _drop_units(tokens):
    """Drop unit words that follow a number ("15 cm^2", "125 miles"); connectives become separators."""
    out = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "word" and text.lower() in ("and", "or", "und", "et", "ou"):
            out.append(("textsep", text))
            i += 1
            continue
        if kind == "word" and text.lower() in ("percent", "pct", "percentage") and out:
            out.append(("op", "%"))
            i += 1
            continue
        if kind == "word" and len(text) > 1 and text not in _FUNCS and text not in ("pi", "sqrt", "inf", "infty") and out and (
            out[-1][0] == "num" or out[-1][1] in (")", "}", "%") or out[-1][0] == "unit"
        ):
            out.append(("unit", text))
            i += 1
            if i < len(tokens) and tokens[i][1] == "^" and i + 1 < len(tokens) and tokens[i + 1][0] == "num":
                i += 2
            continue
        out.append((kind, text))
        i += 1
    return [t for t in out if t[0] != "unit"]


def parse_answer(text: str) -> Answer:
    """Parse one extracted answer.

    >>> parse_answer("\\\\frac{1}{2}").value
    1/2
    >>> parse_answer("x = 2").value
    Relation(ops=('=',), parts=(x, 2))
    >>> parse_answer("[0, 1)").value
    Interval(lo=0, hi=1, left_closed=True, right_closed=False)
    >>> parse_answer("9^{9^{9^{9}}}")
    Traceback (most recent call last):
    ...
    rewards.mathparse.TooBig: exponent too large
    """
    if len(text) > MAX_CHARS:
        raise TooBig("answer too long")
    if "\x00" in text:
        raise ParseError("NUL in answer")
    s = normalize(text)
    s, whole_text = _strip_text_commands(s)
    if whole_text is not None and not re.search(r"\d", whole_text):
        return Answer(Text(_norm_text(whole_text)), source=text)
    s = s.strip().rstrip(".").strip()
    if _SPACE_THOUSANDS.match(s):
        s = s.replace(" ", "")
    if _THOUSANDS.fullmatch(s.lstrip("-")):
        s = s.replace(",", "")
    m = _DEC_COMMA.match(s)
    if m and ((len(m.group(2)) >= 2 and len(m.group(2)) != 3) or m.group(1).lstrip("-") == "0"):
        s = f"{m.group(1)}.{m.group(2)}"
    if re.fullmatch(r"[A-Za-z]{2,}", s) and s.lower() not in ("pi", "inf", "infty", "infinity"):
        return Answer(Text(_norm_text(s)), source=text)
    info = Answer(None, source=text)
    tokens = _drop_units(tokenize(s))
    if not tokens:
        raise ParseError("empty answer")
    info.value = _Parser(tokens, info).parse()
    return info


def _norm_text(t: str) -> str:
    t = t.strip().strip("().").strip()
    return re.sub(r"\s+", " ", t).lower()
