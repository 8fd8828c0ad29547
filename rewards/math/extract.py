"""Answer extraction: which part of a completion (or of a gold solution) is the final answer.

Text up to the last ``</think>`` is reasoning, never the answer (`after_think`). Then the first
rule that matches wins (`candidates`):

1. the last ``<answer>...</answer>``: a ``\\boxed{}`` inside it wins; nothing outside the tags is
   read when the tags are there;
2. the last ``\\boxed{...}`` / ``\\fbox{...}``, or a later "the final answer is ...", "the answer
   is ...", "answer: ..." phrase (up to the end of its sentence); boxes *adjacent* to the last one
   (only punctuation, spacing, or at most four words including "and"/"or" between) are merged
   into one list;
3. a text that is one math segment (``$...$``, ``\\(...\\)``, ...) or a bare answer (no prose).

Otherwise the text is unmarked prose: the last math segment (adjacent ones merged) or the last
number, whichever comes later (`weak`). Each candidate carries a strength: ``True`` (marked),
``False`` (a segment picked out of prose) or `NUMBER` (a number picked out of prose).
"""

from __future__ import annotations

import functools
import re

from rewards.format import ANSWER_OPEN, answer_block
from rewards.math.normalize import drop_script_units
from rewards.math.values import MAX_CHARS

MAX_SCAN_CHARS = 20_000  # only the tail of a completion is searched for the final answer

BOX_COMMANDS = ("\\boxed", "\\fbox", "\\box")  # ``\\box{}`` is an alias of ``\\boxed{}``


def _braced_spans(text: str, commands=BOX_COMMANDS, open_end: bool = False) -> list[tuple[int, int, str]]:
    """(start, end, content) of every ``\\boxed{...}`` whose braces balance; one linear scan.

    ``open_end``: a last box never closed runs to the end of the text (the lenient reading of an
    unterminated box); by default it is not a box at all.
    """
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
            if open_end:
                spans.append((start, n, text[start + len(cmd) + 1 :]))
            return spans
        spans.append((start, j, text[start + len(cmd) + 1 : j - 1]))
        i = start + len(cmd) + 1  # boxes nested inside boxes are found too; the outermost wins below


_GAP_NOISE = re.compile(r"\\text\s*\{([^{}]*)\}|\\(?:quad|qquad|[,;:! ])|\$|\\[()\[\]]|[\s,;.]")


def _adjacent(gap: str, words_allowed: int = 4) -> bool:
    """Two boxes (segments) are one answer when only punctuation and spacing stand between them,
    or at most ``words_allowed`` words, one of them "and"/"or"."""
    words = _GAP_NOISE.sub(lambda m: " " + (m.group(1) or "") + " ", gap).split()
    if not words or not re.search(r"[A-Za-z0-9]", " ".join(words)):
        return True
    if len(words) > words_allowed:
        return False
    return any(w.lower() in ("and", "or") for w in words)


def box_groups(text: str, open_end: bool = False) -> list[str]:
    """The contents of the outermost boxes in a text, in order, adjacent boxes merged into one
    list (``\\boxed{1} and \\boxed{2}`` is ``1, 2``).

    >>> box_groups("\\\\boxed{2\\\\frac{1}{2}}, that is \\\\boxed{\\\\frac{5}{2}}; and \\\\box{3} so 4")
    ['2\\\\frac{1}{2}', '\\\\frac{5}{2}, 3']
    """
    outer = []  # drop boxes nested inside another box
    for s in _braced_spans(text, open_end=open_end):
        if outer and s[0] < outer[-1][1]:
            continue
        outer.append(s)
    groups: list[list] = []
    for s in outer:
        if groups and _adjacent(text[groups[-1][-1][1] : s[0]]):
            groups[-1].append(s)
        else:
            groups.append([s])
    return [g[0][2] if len(g) == 1 else ", ".join(x[2] for x in g) for g in groups]


def _last_boxed(text: str, open_end: bool = False) -> str | None:
    groups = box_groups(text, open_end)
    return groups[-1] if groups else None


_FINAL = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<![\d\\.])\.(?!\.)(?:\s|$)|\n|\bI hope\b")
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
    [('The volume of $ABCD$ is 120', 'phrase'), ('120', 'phrase'), ('ABCD', 'phrase')]
    """
    out = candidates(text)
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


def is_bare(text: str) -> bool:
    """A bare answer: short, no prose, no math delimiters (``-3``, ``x^2+1``, ``\\frac{1}{2}``)."""
    text = text.strip()
    return 0 < len(text) <= MAX_CHARS and "$" not in text.replace("\\$", "") and not _is_prose(drop_script_units(text)) and (
        "\\boxed" not in text and ANSWER_OPEN not in text and _FINAL.search(text) is None
        and "\\[" not in text and "\\(" not in text
    )


PHRASE = "phrase"  # candidate kind: a value picked out of a final-answer phrase written in prose
_HASHES = re.compile(r"(?m)^[ \t]*####[ \t]*([^\n]*)")


def _only_number(s: str) -> str | None:
    """The one number in a short prose answer ("The total is 42 apples"), when the rest is words:
    a number with any other symbol or command around it is no answer ("4 ??", "4\\sqrt(2)")."""
    numbers = list(_NUMBER.finditer(s))
    if len(numbers) != 1 or numbers[0].group().strip() == s.strip() or not clean_number(s, numbers[0]):
        return None
    rest = s[: numbers[0].start()] + " " + s[numbers[0].end() :]
    return numbers[0].group().strip() if re.fullmatch(r"[^\W\d_\s]*(?:[\s.,:;!'$]+[^\W\d_]*)*\s*", rest) else None


def candidates(text: str, open_box: bool = False) -> list[tuple[str, object]]:
    """Candidate answers with their kind, best first (see the module docstring); ``open_box``: a
    last ``\\boxed{`` never closed runs to the end of the text (by default it is no box). The
    reward asks several times about one completion, so the last few answers are remembered."""
    return list(_candidates(text, open_box))


@functools.lru_cache(maxsize=64)
def _candidates(text: str, open_box: bool) -> tuple:
    return tuple(_find_candidates(text, open_box))


def _find_candidates(text: str, open_box: bool) -> list[tuple[str, object]]:
    inner = answer_block(text, closed=False)  # the last <answer> block, closed or not
    if inner is not None and len(inner) > MAX_SCAN_CHARS:
        return [(inner[:MAX_CHARS + 1], True)]  # over the limit: the parser refuses it
    if len(text) > MAX_SCAN_CHARS:
        text = text[-MAX_SCAN_CHARS:]
    if inner is not None:
        boxed = _last_boxed(inner, open_box)
        strong = _strip_delims(boxed if boxed is not None else inner)
        if not strong:
            return []
        out: list[tuple[str, object]] = [(strong, True)]
        if boxed is None:  # prose inside the tags: a final-answer phrase, or its only number
            out += [(c, True) for c, _ in candidates(strong)[:1] if c != strong and _FINAL.search(strong)]
            only = _only_number(strong)
            if only is not None:
                out.append((only, True))
        return out
    strong = None
    boxed_at = -1
    spans = _braced_spans(text, open_end=open_box)
    if spans:
        boxed_at = spans[-1][0]
        strong = _last_boxed(text, open_box)
    m = None
    for m in _FINAL.finditer(text):  # noqa: B007 (keeps the last match)
        pass
    h = None
    for h in _HASHES.finditer(text):  # noqa: B007 (GSM8K's "#### 42" marker; the last one)
        pass
    if h is not None and h.start() > boxed_at and (m is None or h.start() > m.start()):
        marked = _strip_delims(h.group(1))
        return [(marked, True)] if marked else []
    box = [(strong.strip(), True)] if strong is not None and strong.strip() else []
    if m is not None and m.start() > boxed_at:
        rest = text[m.end() :]
        e = _SENTENCE_END.search(rest)
        phrase = _strip_delims(rest[: e.start()] if e else rest)
        if phrase:  # a later phrase wins over a box; the box stays as the next candidate
            if not _is_prose(phrase):  # a marked answer: read as it is, or not at all
                return [(phrase, True)] + box
            return [(phrase, PHRASE)] + [(c, PHRASE) for c, _ in weak(phrase) if c != phrase] + box
    if box:
        return box
    out = []
    stripped = text.strip()
    value = aligned_value(stripped)
    if value is not None:
        out.append((value, True))
    segs = math_segments(stripped)
    if len(segs) == 1 and _strip_delims(stripped) == segs[0]:
        return out + [(segs[0], True)]
    value = final_equation_value(stripped)
    if value is not None:
        out.append((value, True))
    if is_bare(stripped):
        out.append((stripped, True))
    return out + weak(text)


_COMPUTATION = r"(?:[\d\s.,+\-*/^()\[\]{}]|\\(?:times|cdot|div|frac|dfrac|left|right)\b)+"
_FINAL_EQUATION = re.compile(r"(" + _COMPUTATION + r")=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s*\$?"
                             r"((?:\s+(?!(?:or|and|to|plus|minus|times)\b)[A-Za-z]+){0,2})\s*[.!]?$")


_ALIGN_END = re.compile(r"\\begin\{(align\*?|aligned|equation\*?|eqnarray\*?|gather\*?|split)\}((?:(?!\\begin\{).)*?)"
                        r"\\end\{\1\}\s*(?:\$\$|\\\]|\$)?\s*\.?\s*$", re.DOTALL)


def aligned_value(text: str) -> str | None:
    """A text that ends with an ``align`` (``aligned``, ``equation``...) block gives the right-hand
    side of the last ``=`` in its last row, else None.

    >>> aligned_value("\\\\[\\\\begin{align*} S &= 2\\\\cdot 7 + 49 \\\\\\\\ &= 63. \\\\end{align*}\\\\]")
    '63'
    """
    m = _ALIGN_END.search(text[-2000:])
    if m is None:
        return None
    rows = [r for r in re.split(r"\\\\(?:\[[^\]]*\])?", m.group(2)) if r.strip()]
    if not rows or "=" not in rows[-1]:
        return None
    rhs = rows[-1].rsplit("=", 1)[1].replace("&", " ").strip().rstrip(".,").strip()
    rhs = re.sub(r"\\(?:tag|label)\{[^{}]*\}", "", rhs).strip()
    return rhs or None


def final_equation_value(text: str) -> str | None:
    """The value of an unmarked closing statement ``computation = number`` (its left side only
    numbers and operators, after any lead-in words; up to two unit words may follow the number:
    "So 3 + 4 = 7" is 7), else None.

    >>> final_equation_value("So 3 + 4 = 7."), final_equation_value("So x + 4 = 7")
    ('7', None)
    """
    last = text.rstrip().rsplit("\n", 1)[-1][-300:]
    m = _FINAL_EQUATION.search(last)
    if not m or not re.search(r"\d", m.group(1)) or not re.search(r"[+\-*/^]|\\(?:times|cdot|div|frac)", m.group(1)):
        return None
    start = m.start(1) + len(m.group(1)) - len(m.group(1).lstrip())
    before = last[:start].rstrip()
    if start > 0 and (last[start - 1].isalnum() or last[start - 1] in "\\_"):  # it starts mid-word
        return None
    if last[start] in "+-*/^" and before and (before[-1].isalnum() or before[-1] in ")}"):  # "2x + 3 = 7"
        return None
    return m.group(2)


_MATH_AFTER = re.compile(r"\s*(?:[\\(\[{^_*/+=<>|!?#@&~]|\.\.|\d|(?:sqrt|pi|log|ln|exp|sin|cos|tan|root|squared|"
                         r"cubed|over|times|plus|minus|divided)\b|[A-Za-z](?![A-Za-z]))", re.IGNORECASE)


def clean_number(text: str, m: re.Match) -> bool:
    """A number picked out of prose counts only when nothing mathematical touches it: no operator,
    bracket, command, ellipsis, math word or lone letter right after it (``4\\sqrt(2)``,
    ``4 sqrt 2``, ``4 ...``), and no operator or command right before it.

    >>> [clean_number(t, _NUMBER.search(t)) for t in ("it is 4 apples.", "4\\\\sqrt(2)", "4 sqrt 2", "4 ...", "x = 5.")]
    [True, False, False, False, True]
    """
    if _MATH_AFTER.match(text, m.end()):
        return False
    before = text[: m.start()].rstrip()
    return not before or before[-1] not in "\\^_/*+({[|"


def weak(text: str) -> list[tuple[str, bool]]:
    """Unmarked text: the last math segment (adjacent ones merged when only punctuation or one
    "and"/"or" stands between them) and the last clean number, whichever comes later first."""
    spans = _segment_spans(text)
    seg = num = None
    seg_end = num_end = -1
    if spans:
        group = [spans[-1]]
        for sp in reversed(spans[:-1]):
            if _adjacent(text[sp[1] : group[0][0]], 1) and text[sp[1] : group[0][0]].strip():
                group.insert(0, sp)
            else:
                break
        seg = ", ".join(g[2] for g in group)
        seg_end = group[-1][1]
    m = None
    for m in _NUMBER.finditer(text):  # noqa: B007 (keeps the last match)
        pass
    if m is not None and clean_number(text, m):
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


def after_think(text: str) -> str:
    """The thinking block is never the answer (the prompt may have opened it)."""
    close = text.rfind("</think>")
    return text[close + len("</think>") :] if close != -1 else text

