"""A reward that fails on every sample, step after step, stops the run (exit 3) with a line that
names it; a non-number is an error, never coerced; a failing reward logs one line a step, not one
a sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ROOT = ROOT
SHORT = ["trainer.threads=1", "trainer.prompts_per_step=2", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "trainer.steps=20"]


def test_a_string_is_not_a_score():
    from rewards.run import ERROR, call_reward, run_item

    with pytest.raises(TypeError, match="returned str '0.75', not a number"):
        call_reward(lambda c, e, **k: "0.75", "x", {}, {}, {})
    status, value, message = run_item(("tests.failing_plugins:returns_a_string", {}, "x", {}, {}))
    assert (status, value) == (ERROR, None) and "not a number" in message
    assert call_reward(lambda c, e, **k: 1, "x", {}, {}, {}) == 1.0  # ints (and numpy numbers) are numbers


@pytest.mark.parametrize("plugin,workers,kind", [("always_raises", "1", "errors"), ("always_sleeps", "2", "timeouts")])
def test_a_reward_failing_everywhere_for_k_steps_stops_the_run(tmp_path, tiny_base, plugin, workers, kind):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "grpo", "train", "recipes/tiny-cpu.yaml", *SHORT,
                        f"rewards.workers={workers}", "rewards.max_failing_steps=2", "rewards.timeout_s=0.3",
                        f"rewards.functions=[{{name: 'tests.failing_plugins:{plugin}'}}, {{name: format}}]",
                        "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"step 2: reward 'tests.failing_plugins:{plugin}' failed or timed out on every sample for 2" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row[f"reward/tests.failing_plugins:{plugin}/{kind}"] == 8 for row in rows)
    said = "failed on 8 of 8 samples" if kind == "errors" else "timed out (> 0.3 s) on 8 of 8 samples"
    assert r.stderr.count(f"reward tests.failing_plugins:{plugin} {said}") == 2  # a line a step, not a sample


@pytest.mark.parametrize("module,message", [
    ("plugin_raises_at_import", "could not be imported (RuntimeError: this plugin module is broken at import)"),
    ("plugin_hangs_at_import", "importing it took over 1 s"),
])
def test_a_plugin_that_raises_or_hangs_when_imported_is_one_line_before_any_model_loads(
        tmp_path, capsys, monkeypatch, module, message):
    import time

    import rewards.registry
    from grpo.cli import main

    monkeypatch.setattr(rewards.registry, "IMPORT_TIMEOUT_S", 1.0)
    rewards.registry.resolve.cache_clear()
    t = time.monotonic()
    code = main(["train", "recipes/tiny-cpu.yaml", *SHORT, f"rewards.functions=[{{name: 'tests.{module}:reward'}}]",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and f"tests.{module}:reward" in err and "Traceback" not in err, err
    assert time.monotonic() - t < 10
    assert not (tmp_path / "run").exists()


def test_fail_fast_is_one_line_that_names_the_prompt_and_completion(tmp_path, capsys, tiny_base):
    from grpo.cli import main

    code = main(["train", "recipes/tiny-cpu.yaml", *SHORT, "rewards.workers=0", "rewards.fail_fast=true",
                 "rewards.functions=[{name: 'tests.failing_plugins:always_raises'}]", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "failed on sample prompt 0 completion 0 (#0): RuntimeError: this reward is broken" in err, err


def test_grpo_score_refuses_a_missing_input_or_output_directory_before_scoring(tmp_path, capsys):
    from grpo.cli import main

    good = tmp_path / "in.jsonl"
    good.write_text('{"completion": "<answer>1</answer>", "answer": "1"}\n')
    assert main(["score", str(tmp_path / "missing.jsonl"), "--reward", "math_answer"]) == 2
    assert "missing.jsonl: No such file or directory" in capsys.readouterr().err
    out = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    assert main(["score", str(good), "--reward", "math_answer", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and "mean" not in err  # nothing was scored
    assert main(["score", str(good), "--reward", "math_answer", "--out", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["reward"] == 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
