"""Format rewards for the R1-Zero template ``<think>...</think><answer>...</answer>``.

Both checks run in linear time: they only count and find fixed tags (no regular expression, so no
backtracking on thousands of repeated tags). Chat templates that prefill ``<think>`` are handled:
when the prompt (context ``prompt``) ends with ``<think>``, the completion starts inside the
thinking block and must not open it again; when it ends with ``<think></think>`` (thinking
forbidden), the completion is the answer part alone.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def prompt_opens_think(prompt: str | None) -> bool:
    """True when the prompt leaves a thinking block open (a prefilling chat template ends with
    ``<think>``; a template may also start the thinking for the model): its last ``<think>`` comes
    after its last ``</think>``.

    >>> prompt_opens_think("User: 2+2?\\nAssistant: <think>\\n")
    True
    >>> prompt_opens_think("User: 2+2? Think in <think></think>.\\nAssistant: <think>2+2=")
    True
    >>> prompt_opens_think("User: 2+2? Think in <think></think>.\\nAssistant:")
    False
    """
    return bool(prompt) and prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def prompt_closes_think(prompt: str | None) -> bool:
    """True when the prompt ends with an empty, closed thinking block (thinking forbidden: the
    answer comes at once).

    >>> prompt_closes_think("User: 2+2?\\nAssistant: <think></think>")
    True
    """
    text = (prompt or "").rstrip()
    return text.endswith(THINK_CLOSE) and text[: -len(THINK_CLOSE)].rstrip().endswith(THINK_OPEN)


def answer_block(text: str, closed: bool = True) -> str | None:
    """The contents of the last ``<answer>`` block: the one reader of the answer tag for every reward,
    metric and evaluation. None when the text has no ``<answer>``, or (``closed``) when its last
    ``<answer>`` is never closed; with ``closed=False`` an unclosed last block runs to the end.

    >>> answer_block("<answer>1</answer> so <answer> 2 </answer>.")
    ' 2 '
    >>> answer_block("<answer>1</answer><answer>2") is None, answer_block("<answer>2", closed=False)
    (True, '2')
    """
    start = text.rfind(ANSWER_OPEN)
    if start == -1:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end == -1:
        return None if closed else text[start:]
    return text[start:end]


def _effective_text(completion: str, prompt: str | None) -> str:
    """The completion as if it wrote the part of the thinking block the prompt prefilled."""
    if prompt_closes_think(prompt):
        return THINK_OPEN + THINK_CLOSE + completion
    return THINK_OPEN + completion if prompt_opens_think(prompt) else completion


def _tag_positions(text: str):
    """(count, first index) of each of the four tags."""
    return {t: (text.count(t), text.find(t)) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)}


def format_reward(completion: str, example: dict | None = None, **context) -> float:
    """1.0 if the completion is exactly ``<think>...</think><answer>...</answer>``, else 0.0.

    Whitespace is allowed before ``<think>``, between ``</think>`` and ``<answer>`` and after
    ``</answer>``; nothing else is. Each tag appears exactly once, the answer is not empty.

    >>> format_reward("<think>3+4 is 7</think><answer>7</answer>", {})
    1.0
    >>> format_reward("<think>3+4 is 7</think><answer>7</answer> and more", {})
    0.0
    >>> format_reward("3+4 is 7</think>\\n<answer>7</answer>\\n", {}, prompt="Assistant: <think>")
    1.0
    >>> format_reward("<think>a</think><think>b</think><answer>7</answer>", {})
    0.0
    """
    text = _effective_text(completion, context.get("prompt"))
    tags = _tag_positions(text)
    if any(count != 1 for count, _ in tags.values()):
        return 0.0
    i_open, i_close = tags[THINK_OPEN][1], tags[THINK_CLOSE][1]
    a_open, a_close = tags[ANSWER_OPEN][1], tags[ANSWER_CLOSE][1]
    if not (i_open < i_close < a_open < a_close):
        return 0.0
    if text[:i_open].strip():
        return 0.0
    if text[i_close + len(THINK_CLOSE) : a_open].strip():
        return 0.0
    if text[a_close + len(ANSWER_CLOSE) :].strip():
        return 0.0
    if not text[a_open + len(ANSWER_OPEN) : a_close].strip():
        return 0.0
    return 1.0


def format_partial(completion: str, example: dict | None = None, **context) -> float:
    """Partial credit, 0.25 for each of four checks (1.0 exactly when `format_reward` is 1.0).

    1. the thinking block is opened once at the start (or prefilled) and closed once;
    2. one ``<answer>`` after ``</think>``, with only whitespace between them;
    3. one ``</answer>`` after ``<answer>``, with a non-empty answer between;
    4. nothing but whitespace after ``</answer>``.

    >>> format_partial("<think>3+4 is 7</think><answer>7</answer>", {})
    1.0
    >>> format_partial("<think>3+4 is 7</think> the answer is 7", {})
    0.25
    >>> format_partial("<answer>7</answer>", {})
    0.75
    >>> format_partial("", {})
    0.0
    """
    text = _effective_text(completion, context.get("prompt"))
    tags = _tag_positions(text)
    (n_to, i_open), (n_tc, i_close) = tags[THINK_OPEN], tags[THINK_CLOSE]
    (n_ao, a_open), (n_ac, a_close) = tags[ANSWER_OPEN], tags[ANSWER_CLOSE]
    score = 0.0
    think_ok = n_to == 1 and n_tc == 1 and i_open < i_close and not text[:i_open].strip()
    if think_ok:
        score += 0.25
    answer_open_ok = n_ao == 1 and (
        (think_ok and a_open > i_close and not text[i_close + len(THINK_CLOSE) : a_open].strip())
        or (n_to == 0 and n_tc == 0 and not text[:a_open].strip())
    )
    if answer_open_ok:
        score += 0.25
    if n_ao == 1 and n_ac == 1 and a_open < a_close and text[a_open + len(ANSWER_OPEN) : a_close].strip():
        score += 0.25
    if n_ac == 1 and not text[a_close + len(ANSWER_CLOSE) :].strip():
        score += 0.25
    return score
