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

import re

from rewards.format import ANSWER_OPEN, answer_block
from rewards.math.values import MAX_CHARS

MAX_SCAN_CHARS = 20_000  # only the tail of a completion is searched for the final answer

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
    return 0 < len(text) <= MAX_CHARS and "$" not in text.replace("\\$", "") and not _is_prose(text) and (
        "\\boxed" not in text and ANSWER_OPEN not in text and _FINAL.search(text) is None
        and "\\[" not in text and "\\(" not in text
    )


def candidates(text: str) -> list[tuple[str, bool]]:
    inner = answer_block(text, closed=False)  # the last <answer> block, closed or not
    if inner is not None and len(inner) > MAX_SCAN_CHARS:
        return [(inner[:MAX_CHARS + 1], True)]  # over the limit: the parser refuses it
    if len(text) > MAX_SCAN_CHARS:
        text = text[-MAX_SCAN_CHARS:]
    if inner is not None:
        boxed = _last_boxed(inner)
        strong = _strip_delims(boxed if boxed is not None else inner)
        if not strong:
            return []
        out = [(strong, True)]
        if boxed is None:  # prose inside the tags: a final-answer phrase, or its only number
            out += [(c, True) for c, _ in candidates(strong)[:1] if c != strong and _FINAL.search(strong)]
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
        return out + [c for c in weak(strong) if c[0] != strong]
    out = []
    stripped = text.strip()
    segs = math_segments(stripped)
    if len(segs) == 1 and _strip_delims(stripped) == segs[0]:
        return [(segs[0], True)]
    value = final_equation_value(stripped)
    if value is not None:
        out.append((value, True))
    if is_bare(stripped):
        out.append((stripped, True))
    return out + weak(text)


_COMPUTATION = r"(?:[\d\s.,+\-*/^()\[\]{}]|\\(?:times|cdot|div|frac|dfrac|left|right)\b)+"
_FINAL_EQUATION = re.compile(r"(" + _COMPUTATION + r")=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)\s*\$?"
                             r"((?:\s+(?!(?:or|and|to|plus|minus|times)\b)[A-Za-z]+){0,2})\s*[.!]?$")


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


def weak(text: str) -> list[tuple[str, bool]]:
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


def after_think(text: str) -> str:
    """The thinking block is never the answer (the prompt may have opened it)."""
    close = text.rfind("</think>")
    return text[close + len("</think>") :] if close != -1 else text

