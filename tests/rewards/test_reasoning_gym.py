"""The `reasoning_gym` reward: the task's own checker on R1 and boxed answers, refused tasks, the
sandbox worker, the audit scan repeated on the installed package, and `math_answer` on
reasoning-gym tasks whose answers are numbers."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap

import pytest
import reasoning_gym as rg  # installed by make setup (the dev extra)

from rewards import RewardSpec, Scorer
from rewards.math import math_answer
from rewards.reasoning_gym import DENIED, check_task, reasoning_gym_reward, task_names


def _rows(task: str, size: int = 20, **options) -> list[dict]:
    entries = list(rg.create_dataset(task, size=size, seed=3, **options))
    return [{"question": e["question"], "answer": str(e["answer"]),
             "reasoning_gym": {"task": task, "options": options, "entry": e}} for e in entries]


@pytest.mark.parametrize("task", ["basic_arithmetic", "gsm_symbolic"])
def test_checker_scores_r1_and_boxed_answers(task):
    for row in _rows(task, 10):
        gold = row["answer"]
        assert reasoning_gym_reward(f"<think>work</think><answer>{gold}</answer>", row) == 1.0
        assert reasoning_gym_reward(f"so the answer is \\boxed{{{gold}}}.", row) == 1.0
        assert reasoning_gym_reward(f"<answer>{gold}1</answer>", row) < 1.0
        assert reasoning_gym_reward(gold, row) == 0.0  # neither tags nor a box: no final answer


@pytest.mark.parametrize("task", ["basic_arithmetic", "gsm_symbolic"])
def test_math_answer_scores_numeric_reasoning_gym_tasks(task):
    for row in _rows(task, 20):
        gold = row["answer"]
        assert math_answer(f"<think>w</think><answer>{gold}</answer>", row) == 1.0, row["question"]
        assert math_answer(f"\\boxed{{{gold}}}", row) == 1.0
        assert math_answer(f"<answer>{float(gold) + 1:g}</answer>", row) == 0.0


def test_denied_task_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^reasoning_gym task 'n_queens' is refused: its checker calls eval\(\)") as info:
        check_task("n_queens")
    assert "\n" not in str(info.value)
    row = {"reasoning_gym": {"task": "string_insertion", "options": {}, "entry": {"question": "q", "answer": "a"}}}
    with pytest.raises(ValueError, match="refused"):  # a row naming a denied task never reaches its checker
        reasoning_gym_reward("<answer>__import__('os')</answer>", row)
    with pytest.raises(ValueError, match="close names: gsm_symbolic"):
        check_task("gsm_symbolc")


def test_reward_runs_in_a_sandbox_worker_within_the_deadline():
    """The worker imports reasoning_gym before it starts (the zygote preloads it), so the first item
    is scored well within the default 2 s deadline."""
    rows = _rows("gsm_symbolic", 4)
    completions = [f"<answer>{r['answer']}</answer>" for r in rows[:2]] + ["<answer>-1</answer>", "\\boxed{x}"]
    with Scorer([RewardSpec("reasoning_gym")], workers=1, timeout_s=2.0) as scorer:
        assert "reasoning_gym" in scorer.pool.preload
        result = scorer.score(completions, rows)
    assert result.per_function["reasoning_gym"][:2] == [1.0, 1.0]
    assert result.per_function["reasoning_gym"][2] < 1.0 and result.metrics["reward/reasoning_gym/timeouts"] == 0


DANGER = re.compile(r"\beval\(|exec\(|parse_expr|sympify|compile\(|subprocess|literal_eval|sympy|\bsp\.|__import__")
# these two call eval() on their own generated entry (the problem, the gold answer), never on the answer
EVAL_OF_ENTRY = {"bitwise_arithmetic", "number_sorting"}


def _checker_source(cls, fn, seen) -> str:
    """`fn`'s source plus that of the methods of `cls` and the reasoning_gym functions it calls."""
    src = textwrap.dedent(inspect.getsource(fn))
    parts, module = [src], sys.modules[fn.__module__]
    for name in set(re.findall(r"self\.(\w+)\(", src)) | set(re.findall(r"(?<![.\w])(\w+)\(", src)):
        target = getattr(cls, name, None) if f"self.{name}(" in src else getattr(module, name, None)
        if inspect.isclass(target) and target.__module__.startswith("reasoning_gym") and target not in seen:
            seen.add(target)
            parts.append(inspect.getsource(target))
        elif callable(target) and getattr(target, "__module__", "").startswith("reasoning_gym") and target not in seen:
            seen.add(target)
            parts.append(_checker_source(cls, target, seen))
    return "\n".join(parts)


def test_audit_scan_finds_nothing_new():
    """Repeats the audit's scan (rewards/reasoning_gym.py) on the installed package: every allowed
    task's checker, followed through its helpers, calls nothing that evaluates text, and every
    denied task's checker still does (else the list is stale)."""
    from reasoning_gym.factory import DATASETS

    flagged = {name for name in task_names() if name != "composite" and
               DANGER.search(_checker_source(DATASETS[name][0], DATASETS[name][0].score_answer, set()))}
    assert flagged - EVAL_OF_ENTRY == set(DENIED) - {"composite"}
