"""The bounded parser: a final answer in LaTeX or plain text, read by recursive descent.

Model text is never evaluated as code: it is tokenised (`rewards.math.normalize`) and parsed here,
and SymPy objects are built from the parse tree with SymPy constructors (`rewards.math.build`).
Every input is checked against limits first (``MAX_CHARS`` characters, ``MAX_DEPTH`` nesting,
``MAX_DIGITS`` per number, exponent and factorial size), so no computer-algebra call ever sees
``9^{9^{9^9}}`` or ``10000!``.

Grammar (lowest precedence first; ``a*`` repeats, ``[a]`` is optional)::

    top      := relation ((',' | ';' | 'and' | 'or') relation)*       a bare list
    relation := union (relop union)*        relop: = < > <= >= != \\approx \\in \\equiv
    union    := ratio ('\\cup' ratio)*
    ratio    := sum (':' sum)*                                         a ratio a:b
    sum      := ['\\pm'] term (('+' | '-' | '\\pm' | '\\mp') term)*
    term     := unary (('*' | '/') unary | implicit factor)*           918\\frac12: a mixed number
    unary    := ('-' | '+')* power
    power    := postfix ['^' exponent ['!']]
    postfix  := primary ('!' | '%' | "'" | '_' subscript)*             204_5: a base-5 numeral
    primary  := number | word | '(' list ')' | '[' list ']' | '{' top '}' | '\\{' list '\\}'
              | '|' sum '|' | command (`rewards.math.latex`)

Brackets: ``(a, b)`` is a tuple (or an open interval, decided when compared), ``[a, b)`` an
interval, ``\\{a, b\\}`` a set, ``a, b`` a bare list; a single value in brackets is the value.
"""

from __future__ import annotations

import re
from fractions import Fraction

import sympy

from rewards.math import latex
from rewards.math.build import (
    FUNCS,
    PROSE_3,
    RELOPS,
    check_pow,
    combine,
    factorial,
    fail,
    from_base,
    neg,
    sym,
    symbol_only,
)
from rewards.math.normalize import (
    drop_script_units,
    drop_units,
    mixed_number,
    norm_text,
    normalize,
    number_spelling,
    strip_text_commands,
    time_of_day,
    tokenize,
)
from rewards.math.values import (
    MAX_CHARS,
    MAX_DEPTH,
    Answer,
    Interval,
    ParseError,
    PlusMinus,
    Relation,
    Seq,
    Text,
    TooBig,
    Union,
)


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
        while self.peek()[1] in RELOPS or self.at(r"\approx", r"\in", r"\equiv", r"\sim"):
            op = self.take()[1]
            if op == r"\approx":  # "x = 1/3 \approx 0.33": keep what stands before the approximation
                rhs = self.union()
                if not ops and symbol_only(parts[-1]):  # "x \approx 11": the value is 11
                    parts[-1] = rhs
                continue
            if op == r"\in":
                rhs = self.union()
                parts[-1] = rhs  # "x \in [a, b]": the set is the answer
                continue
            if op in (r"\equiv", r"\sim"):
                op = "="
            ops.append(RELOPS.get(op, op))
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
            if self.at(r"\ldots", r"\cdots", r"\dots") or self._at_dots():
                self.pos += 3 if self._at_dots() else 1
                value = combine(value, sympy.Symbol("ELLIPSIS"), "+")
                continue
            rhs = self.term()
            if op in (r"\pm", r"\mp"):
                if isinstance(value, PlusMinus):
                    raise ParseError("nested \\pm")
                value = PlusMinus(value, rhs)
            else:
                value = combine(value, rhs, op)
        return value

    def _at_dots(self):
        """``...`` written with full stops, after an operator: an ellipsis (``1 + 2 + ... + 9``)."""
        return all(self.peek(k) == ("op", ".") for k in range(3))

    def term(self):
        value = self.unary()
        if isinstance(value, sympy.Integer) and self.at(r"\frac") and self.peek(-1)[0] == "num":
            frac = self.unary()  # 918\frac{1}{2}: a mixed number
            if isinstance(frac, sympy.Rational) and not isinstance(frac, sympy.Integer) and 0 < frac < 1:
                value = value + frac if value >= 0 else value - frac
            else:
                value = combine(value, frac, "*")
        while True:
            if self.at("*", "/"):
                op = self.take()[1]
                value = combine(value, self.unary(), op)
            elif self._starts_factor():
                value = combine(value, self.power(), "*")
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
            return neg(self.unary())
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
            if base == sym("e"):  # e raised to a power is Euler's number (e^{i\pi} = -1)
                base = sympy.E
            check_pow(base, exp)
            base = sympy.Pow(base, exp)
            while self.at("!"):
                self.take()
                base = factorial(base)
        return base

    def exponent(self):
        if self.at("{"):
            return self.group()
        if self.at("-"):
            self.take()
            return neg(self.exponent())
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
                value = factorial(value)
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
                    value = from_base(str(value), int(sub))
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
        """A number literal; ``1.5e3`` and ``2.5E-4`` are scientific notation, and their decimals
        count in the unit the value is written to (``2.5E-4``: five decimals)."""
        mantissa, _, exp = text.lower().partition("e")
        shift = int(exp) if exp else 0
        decimals = len(mantissa.split(".", 1)[1]) - shift if "." in mantissa else (-shift if shift < 0 else None)
        if decimals is not None and decimals > 0:
            d = self.info.decimals
            self.info.decimals = decimals if d is None else min(d, decimals)
        value = sympy.Rational(Fraction(mantissa))
        return value * sympy.Rational(10) ** shift if shift else value

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
            return sympy.Abs(inner) if isinstance(inner, sympy.Basic) else fail("abs of a non-expression")
        if kind == "cmd":
            return self.command()
        raise ParseError(f"unexpected {text!r}")

    def word(self):
        _, text = self.take()
        if text in FUNCS:
            return self.apply(FUNCS[text])
        if text == "sqrt":
            return self.apply(sympy.sqrt)
        if text == "pi":
            return sympy.pi
        if text in ("inf", "infty", "infinity"):
            return sympy.oo
        if text == "i":  # the letter i is the imaginary unit: i^2 = -1
            return sympy.I
        if len(text) == 1:
            value = sym(text)
            if self.at("(") and self._looks_like_call():
                return self.call(text)
            return value
        if text.lower() in ("percent", "pct", "percentage"):
            self.info.percent = True
            return sympy.Integer(1)
        # a run of letters: implicit product of one-letter symbols ("xy", "abc"); a longer
        # word in the middle of an answer is prose, not algebra ("The answer is 42")
        if len(text) > 3 or (len(text) == 3 and text.lower() in PROSE_3):
            raise ParseError("prose in the answer")
        value = sympy.Integer(1)
        for c in text:
            value = value * sym(c)
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
        return latex.apply(self, fn)

    def command(self):
        return latex.command(self)

    def frac_arg(self):
        return latex.frac_arg(self)

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
    rewards.math.values.TooBig: exponent too large
    """
    if len(text) > MAX_CHARS:
        raise TooBig("answer too long")
    if "\x00" in text:
        raise ParseError("NUL in answer")
    s = normalize(text)
    s, whole_text = strip_text_commands(s)
    if whole_text is not None and not re.search(r"\d", whole_text):
        return Answer(Text(norm_text(whole_text)), source=text)
    s = s.strip()
    if s.endswith(".") and not s.endswith(".."):  # one closing full stop; an ellipsis is no answer's end
        s = s[:-1].strip()
    s = number_spelling(drop_script_units(s))
    clock = time_of_day(s)
    if clock is not None:
        return Answer(Text("time " + clock), source=text)
    s = mixed_number(s)
    if re.fullmatch(r"[A-Za-z]{2,}", s) and s.lower() not in ("pi", "inf", "infty", "infinity"):
        return Answer(Text(norm_text(s)), source=text)
    info = Answer(None, source=text)
    tokens = drop_units(tokenize(s))
    if not tokens:
        raise ParseError("empty answer")
    info.value = _Parser(tokens, info).parse()
    return info


