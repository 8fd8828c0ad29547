"""What the thinking block holds: its text, and whether its arithmetic steps are consistent.

R1-Zero's signature is not the format but what happens inside ``<think>``: the model writes more
intermediate work, and that work is right. These functions measure it on untrusted text, in
linear time and on a bounded prefix, with no evaluation of model text as code:

- `written_think`, `think_block`: what the completion wrote inside the thinking block, and the
  whole block (the prompt may have opened it, even begun it, or opened and closed it: then the
  completion starts inside it or after it);
- `arithmetic_steps`: the chains of equalities ``e0 = e1 = ... = ek`` in a text whose parts are
  integer sums and differences (``47+8+6=55+6=61``), read by a small scanner, not by `eval`;
- `think_steps`: a reward (usable at weight 0 as a metric): 1.0 when the thinking block holds
  worked steps (at least two equalities: a value between the question and the answer), every
  step keeps the value (``e_i`` and ``e_{i+1}`` are equal), and the last value is the answer given
  in ``<answer>``; else 0.0. A bare ``question = answer`` is no worked step, right or wrong.

Bounds: only the first `MAX_THINK_CHARS` characters of a thinking block are read, a number has
at most `MAX_DIGITS` digits and a part at most `MAX_TERMS` terms; past a bound a part is not
arithmetic, so it breaks the chain instead of costing time.
"""

from __future__ import annotations

from rewards.format import THINK_CLOSE, THINK_OPEN, answer_block, prompt_closes_think, prompt_opens_think

MAX_THINK_CHARS = 4000
MAX_DIGITS = 30
MAX_TERMS = 64


def written_think(completion: str, prompt: str | None = None) -> str | None:
    """The part of the thinking block the completion wrote: '' when the prompt closed the block
    (thinking forbidden), None when the completion leaves no closed block.

    >>> written_think("<think>47+8=55</think><answer>55</answer>")
    '47+8=55'
    >>> written_think("55</think><answer>55</answer>", prompt="Assistant: <think>47+8=")
    '55'
    >>> written_think("<answer>55</answer>", prompt="Assistant: <think></think>")
    ''
    >>> written_think("55") is None
    True
    """
    if prompt_closes_think(prompt):
        return ""
    if prompt_opens_think(prompt):
        start = 0
    else:
        start = completion.find(THINK_OPEN)
        if start == -1:
            return None
        start += len(THINK_OPEN)
    end = completion.find(THINK_CLOSE, start)
    return None if end == -1 else completion[start:end]


def think_block(completion: str, prompt: str | None = None) -> str | None:
    """The whole thinking block: what the prompt wrote of it (a template that opens it) and what
    the completion wrote; '' or None as `written_think`.

    >>> think_block("55</think><answer>55</answer>", prompt="Assistant: <think>47+8=")
    '47+8=55'
    """
    written = written_think(completion, prompt)
    if not written or not prompt_opens_think(prompt):
        return written
    return prompt[prompt.rfind(THINK_OPEN) + len(THINK_OPEN) :][-MAX_THINK_CHARS:] + written


def _value(part: str) -> int | None:
    """The integer value of ``[-]n (+|-) n ...`` (spaces allowed), or None if the part is anything else."""
    s = part.replace(" ", "")
    if not s or len(s) > MAX_TERMS * (MAX_DIGITS + 1):
        return None
    total, sign, i, terms = 0, 1, 0, 0
    if s[0] in "+-":
        sign, i = (-1 if s[0] == "-" else 1), 1
    while True:
        j = i
        while j < len(s) and s[j].isdigit():
            j += 1
        if j == i or j - i > MAX_DIGITS:
            return None
        total += sign * int(s[i:j])
        terms += 1
        if j == len(s):
            return total
        if s[j] not in "+-" or terms >= MAX_TERMS:
            return None
        sign, i = (-1 if s[j] == "-" else 1), j + 1


def arithmetic_steps(text: str) -> list[list[int | None]]:
    """Each line's chain of ``=``-joined parts, as their values (None for a part that is not an
    integer sum); lines without ``=`` are left out.

    >>> arithmetic_steps("47+8+6=55+6=61")
    [[61, 61, 61]]
    >>> arithmetic_steps("so 3+4=8")
    [[None, 8]]
    """
    chains = []
    for line in text[:MAX_THINK_CHARS].replace(",", "\n").replace(";", "\n").splitlines():
        if "=" in line:
            chains.append([_value(p) for p in line.split("=")])
    return chains


def steps_consistent(completion: str, prompt: str | None = None) -> bool:
    """Worked steps in the thinking block (two equalities or more), every step keeps the value,
    and the last value is the answer (see the module docstring).

    >>> steps_consistent("<think>47+8+6=55+6=61</think><answer>61</answer>")
    True
    >>> steps_consistent("<think>47+8+6=55+6=62</think><answer>62</answer>")
    False
    >>> steps_consistent("<think>61</think><answer>61</answer>")
    False
    """
    block = think_block(completion, prompt)
    if not block:
        return False
    chains = arithmetic_steps(block)
    if sum(len(c) - 1 for c in chains) < 2 or any(None in c or len(set(c)) != 1 for c in chains):
        return False  # a worked step needs a value between the question and the answer
    answer = answer_block(completion)
    return answer is not None and _value(answer.strip()) == chains[-1][-1]


def think_steps(completion: str, example: dict | None = None, **context) -> float:
    """Reward: 1.0 when `steps_consistent`, else 0.0 (as a metric: weight 0).

    >>> think_steps("<think>10+5+3=15+3=18</think><answer>18</answer>", {"answer": "18"})
    1.0
    """
    return 1.0 if steps_consistent(completion, context.get("prompt")) else 0.0
