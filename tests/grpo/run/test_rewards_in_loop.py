"""A reward plugin that raises on one sample in ten does not stop the tiny-cpu recipe: the errors
are counted per step in metrics.jsonl and the run finishes."""

from __future__ import annotations

import json

from tests.conftest import run_cli

FUNCTIONS = ('rewards.functions=[{name: math_answer, kwargs: {answer_tag: true}}, {name: format, weight: 0.5}, '
             '{name: "tests.rewards_plugins:raises_one_in_ten", weight: 0.1}]')


def test_raising_plugin_is_counted_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "recipes/tiny-cpu.yaml", FUNCTIONS, "trainer.steps=3", "eval.num_prompts=8",
                   "logging.progress=false", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 8 prompts x 8 completions: sample indices 0..63, so 0, 10, ..., 60 raise: 7 per step
    assert [r["reward/tests.rewards_plugins:raises_one_in_ten/errors"] for r in rows] == [7.0, 7.0, 7.0]
    assert all(r["reward/math_answer/errors"] == 0.0 for r in rows)
    assert (out / "summary.json").exists() and (out / "final" / "config.json").exists()
