"""The real CLI in a subprocess on the tiny-cpu recipe: the run directory it writes, and learning.

Both tests use the built-in tiny base (pretrained by our own code and cached); the fixture builds
it once per machine before the timed part starts.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import run_cli


def test_train_writes_a_complete_run_directory(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=3", "eval.num_prompts=16",
                     "logging.rollouts_every=2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before RL" in result.stdout and "after RL" in result.stdout

    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["trainer"]["steps"] == 3 and "max_grad_norm" in resolved["trainer"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "reward/math_answer", "reward/format", "train/loss", "train/grad_norm",
                "rollout/accuracy", "rollout/tokens_per_s", "time/generate", "time/train"):
        assert key in rows[-1], key
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["step-000002.jsonl", "step-000003.jsonl"]
    sample = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert sample and {"prompt", "completion", "rewards", "advantage", "answer"} <= set(sample[0])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_before"]["accuracy"] <= 1.0 and summary["eval_after"]["num_prompts"] == 16
    assert summary["train"]["format_reward_last"] is not None
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == "qwen3_moe" and tokenizer.eos_token == "<eos>"


@pytest.mark.slow
def test_shortened_recipe_learns(tmp_path, tiny_base):
    """RL alone must raise held-out greedy accuracy (answer in the format) by at least 0.3."""
    out = tmp_path / "run"
    started = time.perf_counter()
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=60", "eval.num_prompts=100",
                     "logging.progress=false", "--output-dir", str(out))
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
    print(f"accuracy {before:.3f} -> {after:.3f} in {seconds:.0f} s")
    assert after - before >= 0.3, summary


@pytest.fixture(scope="session")
def sums_base():
    """The built-in base of the reasoning recipe (`tiny-sums-moe`), built before any timed part."""
    from grpo.model.tiny import ensure_tiny_base

    return ensure_tiny_base("tiny-sums-moe", progress=False)


@pytest.mark.slow
def test_shortened_reasoning_recipe_raises_correctness_and_thinking(tmp_path, sums_base):
    """RL alone on the reasoning recipe: correctness itself rises (the answer anywhere, not only in
    the format), the completions think longer, and their steps are more often right."""
    out = tmp_path / "run"
    # 60 steps of 8 prompts at the full rate from the start: a quarter of the recipe's work
    result = run_cli("train", "recipes/tiny-reasoning-cpu.yaml", "trainer.steps=60", "trainer.prompts_per_step=8",
                     "trainer.warmup_steps=0", "eval.num_prompts=100", "logging.progress=false", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after, think = summary["eval_before"], summary["eval_after"], summary["thinking"]
    print(before["answer_anywhere"], after["answer_anywhere"], think)
    assert after["answer_anywhere"] - before["answer_anywhere"] >= 0.3, summary
    assert after["accuracy"] >= 0.6, summary
    assert think["think_tokens_last_10pct"] >= 1.5 * think["think_tokens_first_10pct"], think
    assert think["consistent_last_10pct"] - think["consistent_first_10pct"] >= 0.3, think
    assert "tokens inside <think> per completion" in result.stdout
    assert "no progress" not in result.stderr  # the watchdog's default thresholds never fire on a healthy run
