"""Text to tokens: LaTeX noise out, symbols in one spelling, numbers in one format.

`normalize` maps unicode look-alikes to ASCII (minus signs, full-width digits, ``×``), drops
spacing and sizing commands, turns ``\\dfrac`` into ``\\frac`` and comparison commands into
operators; `number_spelling` removes thousands separators and reads a single decimal comma;
`drop_units` removes unit words after a number. The policy is documented in `rewards.math`.
"""

from __future__ import annotations

import re

from rewards.math.build import FUNCS
from rewards.math.values import MAX_DIGITS, ParseError, TooBig

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
    s = re.sub(r"\{\s*,\s*\}", "", s)  # 14{,}916 and 14 {, }916
    s = s.replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*")
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
    (?P<num>(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,3}(?![\d.A-Za-z^(]))?)
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


# ------------------------------------------------------------------ entry point

_TEXT_RE = re.compile(r"\\(" + "|".join(_TEXT_CMDS) + r")\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.])[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d,])")
_SPACE_THOUSANDS = re.compile(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_DEC_COMMA = re.compile(r"^(-?\d+),(\d+)$")


def strip_text_commands(s: str) -> tuple[str, str | None]:
    """Replace ``\\text{...}`` by its content; unit words and connectives are handled by the caller.

    Returns the new string and, if the whole answer is one text command, its content.
    """
    whole = _TEXT_RE.fullmatch(s.strip())
    if whole:
        return whole.group(2), whole.group(2)
    return _TEXT_RE.sub(lambda m: " " + m.group(2) + " ", s), None


def drop_units(tokens):
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
        if kind == "word" and len(text) > 1 and text not in FUNCS and text not in ("pi", "sqrt", "inf", "infty") and out and (
            out[-1][0] == "num" or out[-1][1] in (")", "}", "%") or out[-1][0] == "unit"
        ):
            out.append(("unit", text))
            i += 1
            if i < len(tokens) and tokens[i][1] == "^" and i + 1 < len(tokens) and tokens[i + 1][0] == "num":
                i += 2
            continue
        if kind == "word" and text in _SI_LETTERS and out and out[-1][0] == "num" and (
            i + 1 == len(tokens) or tokens[i + 1][1] in (";", ",")
        ):  # "5 m; 3 s": a one-letter SI unit after a number, before a separator or the end
            i += 1
            continue
        out.append((kind, text))
        i += 1
    return [t for t in out if t[0] != "unit"]


_SI_LETTERS = {"m", "s", "g", "h", "l", "L", "K", "N", "J", "W", "V", "A"}

_SCRIPT_UNIT = re.compile(r"(?<=[\d%}])\s*(?:(?![\u0370-\u03ff])[^\W\d_A-Za-z][^\W\d_]*\.?"
                          r"(?:\s*[\^/]\s*(?:\d|[^\W\d_]+))?\s*)+(?=$|[;,])")


def drop_script_units(s: str) -> str:
    """Words in any script other than Latin or Greek right after a number, up to a separator or the end,
    are a unit and are dropped (``5 米``, ``12 яблок``, ``5 米; 3 秒``); Latin unit words are
    `drop_units`' work.

    >>> drop_script_units("5 \u7c73; 3 \u79d2"), drop_script_units("x = 5 \u043c\u002e")
    ('5; 3', 'x = 5')
    """
    return _SCRIPT_UNIT.sub("", s)


def norm_text(t: str) -> str:
    t = t.strip().strip("().").strip()
    return re.sub(r"\s+", " ", t).lower()


def number_spelling(s: str) -> str:
    """One spelling for a plain number: ``1 000`` and ``7,425,000`` lose their separators; a single
    comma before two, four or more digits (or after a lone 0) is a decimal comma (``1,22``)."""
    if _SPACE_THOUSANDS.match(s):
        s = s.replace(" ", "")
    if _THOUSANDS.fullmatch(s.lstrip("-")):
        s = s.replace(",", "")
    m = _DEC_COMMA.match(s)
    if m and ((len(m.group(2)) >= 2 and len(m.group(2)) != 3) or m.group(1).lstrip("-") == "0"):
        s = f"{m.group(1)}.{m.group(2)}"
    return s


_TIME = re.compile(r"(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?\s*(?:([ap])\.?\s*m\.?)?", re.IGNORECASE)


def time_of_day(s: str) -> str | None:
    """A time of day in 24-hour form ``HH:MM`` (``HH:MM:SS``), or None.

    A time with an AM/PM marker is read on the 24-hour clock (``3:00 PM`` is ``15:00``, ``12:00 AM``
    is ``00:00``); without a marker ``15:30`` stays a ratio, which `rewards.math.compare` matches
    with a marked time.

    >>> time_of_day("3:30 p.m."), time_of_day("12 AM"), time_of_day("15:30")
    ('15:30', '00:00', None)
    """
    m = _TIME.fullmatch(s.strip())
    if not m or m.group(4) is None:
        return None
    hour, minute, second = int(m.group(1)), int(m.group(2) or 0), m.group(3)
    marker = (m.group(4) or "").lower()
    if minute > 59 or (second is not None and int(second) > 59):
        return None
    if marker:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if marker == "p" else 0)
    elif hour > 23:
        return None
    return f"{hour:02d}:{minute:02d}" + (f":{second}" if second is not None else "")


_MIXED = re.compile(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d./])")


def mixed_number(s: str) -> str:
    """An answer that starts with ``W N/D`` (a whole number, a space, a proper fraction) is the
    mixed number W + N/D (``5 1/2`` is 11/2, ``1 1/2`` is 3/2); anything else is left as it is."""
    m = _MIXED.match(s)
    if not m or not 0 < int(m.group(3)) < int(m.group(4)):
        return s
    sign, whole, n, d = m.groups()
    return f"{sign}({whole}+{n}/{d})" + s[m.end():]
