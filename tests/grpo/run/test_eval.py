"""Evaluation: the estimators by hand, maj@k voting, and `grpo eval` reproducing a training run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from grpo.run.evaluate import final_answer, format_table, majority_correct, pass_at_k, pass_ks
from tests.conftest import ROOT

REPO = ROOT


def test_pass_at_k_hand_computed():
    # n = 5 samples, c = 2 correct, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k = 1 is the share of correct samples: 2/5
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    # n = 8, c = 1, k = 4: 1 - C(7,4)/C(8,4) = 1 - 35/70 = 0.5
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)
    # fewer wrong samples than k: every k-subset holds a correct one
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 4) == 0.0


def test_pass_at_k_matches_binomials_and_is_stable_for_large_n():
    for n in (1, 7, 16, 50):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # C(2000, 1000) overflows a float; the product form does not
    value = pass_at_k(2000, 3, 1000)
    assert 0.87 < value < 0.88  # 1 - (1/2)^3 approximately
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_pass_ks():
    assert pass_ks(1) == [1] and pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6]


def test_final_answer_and_majority_vote():
    assert final_answer("<think>x</think><answer> 3 + 4 </answer>") == "3+4"
    assert final_answer("so \\boxed{\\frac{1}{2}} is it") == "\\frac{1}{2}"
    assert final_answer("no answer") is None and final_answer("\\boxed{unclosed") is None
    # answers 7, 7, 8, none: 7 wins; correct when a sample with 7 was judged correct
    assert majority_correct(["7", "7", "8", None], [True, False, False, False])
    assert not majority_correct(["7", "7", "8", None], [False, False, True, False])
    # tie between 8 and 7: the first seen (8) wins
    assert majority_correct(["8", "7", "7", "8"], [True, False, False, True])
    assert not majority_correct([None, None], [False, False])


def test_format_table_lists_every_metric():
    text = format_table({"datasets": {"heldout": {"greedy_accuracy": 0.5, "num_prompts": 4},
                                      "aime24": {"greedy_accuracy": 0.25, "num_prompts": 30, "pass@4": 0.5}}})
    assert text.splitlines()[0].split() == ["data", "set", "greedy_accuracy", "num_prompts", "pass@4"]
    assert "aime24" in text and "0.250" in text and "-" in text.splitlines()[1]


def _run(args, env, timeout=900):
    done = subprocess.run([sys.executable, "-m", "grpo", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_grpo_eval_reproduces_the_training_summary(tmp_path):
    """A short run of the tiny-cpu recipe, then `grpo eval` on its final model: the same held-out
    prompts, greedy, give the same accuracy (and the same completions) as the training summary;
    the in-training evaluation wrote eval/step-N.json and logged eval/ metrics."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    overrides = ["trainer.steps=4", "eval.num_prompts=24", "eval.every=2", "eval.k=2", "trainer.threads=1",
                 "rewards.workers=0", "logging.progress=false"]
    _run(["train", "recipes/tiny-cpu.yaml", *overrides, "--output-dir", str(run)], env)
    summary = json.loads((run / "summary.json").read_text())
    after = summary["eval_after"]

    in_training = json.loads((run / "eval" / "step-2.json").read_text())
    assert in_training["step"] == 2 and {"greedy_accuracy", "avg@2", "pass@1", "pass@2", "maj@2"} <= set(
        in_training["datasets"]["heldout"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/heldout/greedy_accuracy" in row for row in logged)

    out = _run(["eval", "recipes/tiny-cpu.yaml", "--checkpoint", str(run / "final"), "--out", str(run),
                "eval.num_prompts=24", "trainer.threads=1", "rewards.workers=0"], env)
    report = json.loads((run / "eval" / "step-4.json").read_text())  # `final` of a 4-step run
    heldout = report["datasets"]["heldout"]
    assert heldout["num_prompts"] == after["num_prompts"] == 24
    assert heldout["greedy_accuracy"] == after["accuracy"]
    assert heldout["format"] == after["format"] and heldout["answer_anywhere"] == after["answer_anywhere"]
    assert [e["completion"] for e in report["examples"]["heldout"]] == [e["completion"] for e in after["examples"]]
    assert f"{after['accuracy']:.3f}" in out
