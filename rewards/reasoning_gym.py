"""The `reasoning_gym` reward: a reasoning-gym task's own checker (`score_answer`) on the final answer.

A row of a ``reasoning_gym:<task>`` source (`grpo.data.gym`) carries
``{"reasoning_gym": {"task": ..., "options": {...}, "entry": {...}}}``: the task's name, its config
options and the generated entry (question, answer, metadata) as JSON. The reward reads the
completion's final answer, the last ``<answer>...</answer>`` block (`rewards.format.answer_block`,
the R1 templates) or else the last ``\\boxed{...}`` (the boxed templates), and returns the task's
``score_answer(answer, entry)``: 1.0 when right, partial credit or 0.0 otherwise, as the task
defines it. A row without the ``reasoning_gym`` key: None (does not apply).

Security audit (reasoning-gym 0.1.25; `AUDITED_VERSION`). Model text is never evaluated as code, so
a task is allowed only when its ``score_answer``, and every function and method it calls, treats the
answer as data (string comparison, ``float``/``int``/``Decimal``/``Fraction``, ``json.loads``,
regular expressions). Checked by reading the sources found by ``grep -E 'eval\\(|exec\\(|parse_expr|
sympify|compile\\(|subprocess|literal_eval|sympy'`` over the package and following each
``score_answer`` through the helpers it calls (`tests/rewards/test_reasoning_gym.py` repeats that
scan, so a changed checker is caught). Refused (`DENIED`), with the reason:

- ``eval()`` of the answer: binary_matrix, n_queens, spiral_matrix, string_insertion;
- sympy's ``parse_expr`` of the answer (it calls ``eval``): countdown, puzzle24,
  polynomial_multiplication, simple_integration, intermediate_integration;
- composite: scores with whichever task an entry names, so it is only as safe as the least safe.

Allowed although their module calls ``eval``: bitwise_arithmetic (``eval`` of the generated problem
in the entry, the answer only through ``int(answer, 0)``) and number_sorting (``json.loads`` of the
answer; ``eval`` only of the gold answer when that is not JSON); basic_arithmetic and gsm_symbolic
use ``eval`` only while generating. The entry is our own generated data, never model text.

Any other version of the package is refused whole: the audit is of one version's code. Unknown
task names are refused with the closest known names.

Where it runs: like every reward, in a sandbox worker with a per-item deadline and a memory limit
(`rewards.sandbox`; the zygote imports ``reasoning_gym`` once, see ``NEEDS`` there); each worker
builds a task's checker once (`_checker`, cached). Answers longer than `MAX_ANSWER_CHARS` score 0
without reaching the checker.
"""

from __future__ import annotations

import difflib
import functools
import json

from rewards.format import answer_block

AUDITED_VERSION = "0.1.25"
MAX_ANSWER_CHARS = 10_000

DENIED: dict[str, str] = {
    **dict.fromkeys(("binary_matrix", "n_queens", "spiral_matrix", "string_insertion"),
                    "its checker calls eval() on the model's answer"),
    **dict.fromkeys(("countdown", "puzzle24", "polynomial_multiplication", "simple_integration",
                     "intermediate_integration"),
                    "its checker parses the model's answer with sympy's parse_expr, which calls eval()"),
    "composite": "it scores with whichever task an entry names, so the audit cannot vouch for it",
}
INSTEAD = {"countdown": " (use data.source=countdown with the `countdown` reward, which never evaluates code)"}


def installed_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("reasoning-gym")
    except importlib.metadata.PackageNotFoundError:
        return None


def task_names() -> list[str]:
    """Every task the installed reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_task(task: str) -> None:
    """Raise ValueError (one line naming the task) unless `task` is an installed, audited, allowed task.

    >>> check_task("gsm_symbolic")
    >>> check_task("countdown")
    Traceback (most recent call last):
    ...
    ValueError: reasoning_gym task 'countdown' is refused: its checker parses the model's answer with sympy's parse_expr, which calls eval() (use data.source=countdown with the `countdown` reward, which never evaluates code)
    """
    version = installed_version()
    if version is None:
        raise ValueError(f"reasoning_gym task {task!r}: the package reasoning-gym is not installed "
                         f"(pip install reasoning-gym=={AUDITED_VERSION})")
    if version != AUDITED_VERSION:
        raise ValueError(f"reasoning_gym task {task!r}: reasoning-gym {version} is installed, but only the checkers "
                         f"of {AUDITED_VERSION} were audited (rewards/reasoning_gym.py); install that version")
    names = task_names()
    if task not in names:
        close = difflib.get_close_matches(task, names, n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"{len(names)} tasks, e.g. {', '.join(names[:8])}, ..."
        raise ValueError(f"unknown reasoning_gym task {task!r}; {hint}")
    if task in DENIED:
        raise ValueError(f"reasoning_gym task {task!r} is refused: {DENIED[task]}{INSTEAD.get(task, '')}")


def boxed_text(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` whose braces balance (one linear scan), else None.

    >>> boxed_text("so \\\\boxed{a} then \\\\boxed{ {b} c }."), boxed_text("\\\\boxed{open")
    (' {b} c ', None)
    """
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: an earlier box may be whole
    return None


def final_answer_text(completion: str) -> str | None:
    """The answer a completion commits to: the last closed ``<answer>`` block, else the last
    ``\\boxed{}``; stripped. None when there is neither.

    >>> final_answer_text("<think>2+2</think><answer> 4 </answer>"), final_answer_text("so \\\\boxed{4}.")
    ('4', '4')
    """
    inner = answer_block(completion)
    if inner is None:
        inner = boxed_text(completion[-MAX_ANSWER_CHARS * 2:])
    return None if inner is None else inner.strip()


@functools.lru_cache(maxsize=32)
def _checker(task: str, options_json: str):
    """The `score_answer` of `task` built with its recipe options (once per worker and options)."""
    check_task(task)
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(options_json)).score_answer


def reasoning_gym_reward(completion: str, example: dict, **context) -> float | None:
    """The task's own score of the final answer (see the module docstring); None for other rows.

    >>> entry = {"question": "What is 2+2?", "answer": "4", "metadata": {}}
    >>> row = {"reasoning_gym": {"task": "basic_arithmetic", "options": {}, "entry": entry}}
    >>> reasoning_gym_reward("<think>2+2=4</think><answer>4</answer>", row), reasoning_gym_reward("\\\\boxed{4}", row)
    (1.0, 1.0)
    >>> reasoning_gym_reward("<answer>5</answer>", row), reasoning_gym_reward("4", row), reasoning_gym_reward("4", {})
    (0.0, 0.0, None)
    """
    spec = example.get("reasoning_gym")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str) or not isinstance(spec.get("entry"), dict):
        raise ValueError("example['reasoning_gym'] must be {task: str, options: dict, entry: dict}")
    score = _checker(spec["task"], json.dumps(spec.get("options") or {}, sort_keys=True))
    answer = final_answer_text(completion) if isinstance(completion, str) else None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return float(score(answer, spec["entry"]))
