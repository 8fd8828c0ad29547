"""`reasoning_gym:<task>` sources (grpo/data/gym.py), the derived `eval.correct`, and a short
`grpo train` on one: rows carry the JSON entry, held-out questions are never trained on, a bad
task or option is one line, a boxed template is judged on the answer alone."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.config import DataConfig, load_recipe
from grpo.data.gym import GymError
from grpo.data.sources import load_rows
from tests.conftest import ROOT


def _data(task: str = "basic_arithmetic", size: int = 60, **options) -> DataConfig:
    return DataConfig(source=f"reasoning_gym:{task}", reasoning_gym={"size": size, "options": options})


def test_rows_carry_the_entry_and_held_out_questions_are_never_trained_on():
    # one- and two-digit sums of two terms repeat questions: repeats are kept once, then split
    data = _data(size=300, min_terms=2, max_terms=2, max_digits=1, operators=["+"])
    train, heldout = load_rows(data, 20)
    assert len(heldout) == 20 and not {r["question"] for r in train} & {r["question"] for r in heldout}
    assert len({r["question"] for r in train}) == len(train) < 300 - 20  # repeats dropped
    row = train[0]
    assert json.loads(json.dumps(row)) == row  # what travels to the reward workers is plain JSON
    spec = row["reasoning_gym"]
    assert spec["task"] == "basic_arithmetic" and spec["entry"]["answer"] == row["answer"]
    assert spec["options"]["max_digits"] == 1
    again, _ = load_rows(data, 20)
    assert again == train  # seeded


@pytest.mark.parametrize("task,options,message", [
    ("basic_arithmetc", {}, "unknown reasoning_gym task 'basic_arithmetc'; close names: basic_arithmetic"),
    ("countdown", {}, "reasoning_gym task 'countdown' is refused: its checker parses the model's answer"),
    ("basic_arithmetic", {"max_term": 3}, "data.reasoning_gym.options.max_term: not an option of reasoning_gym "
                                          "task 'basic_arithmetic' (close names: max_terms"),
    ("basic_arithmetic", {"min_terms": 5, "max_terms": 2}, "rejected them: AssertionError: max_terms must be >= min_terms"),
])
def test_a_bad_task_or_option_is_one_line(task, options, message):
    with pytest.raises(GymError) as info:
        load_rows(_data(task, 10, **options), 2)
    assert message in str(info.value) and "\n" not in str(info.value)


class _ScriptedEngine:
    """Stands in for the policy's output: evaluation needs one known completion per prompt, and no
    model writes a chosen text on demand."""

    def __init__(self, text: str):
        self.text = text

    def generate(self, prompt_ids, n, sampling):
        from rollout.base import Rollout

        return [Rollout(group=i, prompt_ids=tuple(p), completion_ids=(), text=self.text, logprobs=(), finish_reason="stop")
                for i, p in enumerate(prompt_ids) for _ in range(n)]


class _Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text[:8]]


def test_boxed_template_counts_a_correct_boxed_answer_without_eval_correct():
    """Before `eval.correct` followed the template, the default [math_answer, format] asked a boxed
    completion for the R1 tags too, and evaluation reported 0.0 for right answers."""
    from grpo.run.evaluate import evaluate_greedy, make_eval_scorer

    cfg = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["data.template=qwen_math_boxed", "rewards.workers=0"])
    rows = [{"question": "3+4", "answer": "7"}]
    scorer = make_eval_scorer(cfg)
    try:
        report = evaluate_greedy(_ScriptedEngine("3+4 is 7, so \\boxed{7}"), _Tokenizer(), cfg, rows, scorer)
    finally:
        scorer.close()
    assert report["accuracy"] == 1.0 and report["correct"] == ["math_answer"]


def test_train_on_a_reasoning_gym_task_logs_its_reward(tmp_path, tiny_base, capsys):
    from grpo.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:  # in-process (as tests/grpo/commands/test_recipes_toy.py): no second interpreter start-up
        code = main(["train", str(ROOT / "recipes/tiny-cpu.yaml"), "data.source=reasoning_gym:basic_arithmetic",
                     "data.reasoning_gym.size=40", "data.reasoning_gym.options={min_terms: 2, max_terms: 2}",
                     "rewards.functions=[{name: reasoning_gym}, {name: format, weight: 0.5}]", "rewards.workers=1",
                     "trainer.steps=2", "trainer.prompts_per_step=2", "rollout.group_size=2", "eval.num_prompts=2",
                     "logging.progress=false", "--output-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "reward/reasoning_gym" in rows[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] == ["reasoning_gym", "format"]
    assert "correct: reasoning_gym and format score 1.0" in printed
