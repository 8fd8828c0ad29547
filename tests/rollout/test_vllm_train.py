"""The tiny-cpu recipe with `rollout.engine=vllm`: the real CLI in a subprocess, vLLM's CPU build.

`grpo train` samples every rollout and runs both held-out evaluations with the colocated vLLM engine
(weights pushed after every step), then `grpo eval` evaluates the final model with the transformers
engine, which must score what vLLM scored after the last push. A broken engine path fails here: a
start-up error, a weight sync that raises or leaves stale weights, or an evaluation that silently
falls back to the transformers engine (the engine's log line is checked). `grpo eval` on the vLLM
engine runs for every recipe in tests/grpo/commands/test_recipes_toy.py.
"""

from __future__ import annotations

import json
import re

from tests.conftest import require_vllm, run_cli

require_vllm()



def test_train_and_eval_run_on_the_vllm_engine(tmp_path, tiny_base):
    out = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1"}
    result = run_cli("train", "recipes/tiny-cpu.yaml", "rollout.engine=vllm", "trainer.steps=2", "eval.num_prompts=16",
                     "logging.progress=false", "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vLLM has no sleep mode on platform cpu" in result.stderr  # the option adapted, with one line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["time/weight_sync"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"]["num_prompts"] == 16 and summary["eval_after"]["num_prompts"] == 16

    plain = run_cli("eval", "recipes/tiny-cpu.yaml", "eval.num_prompts=16", "--checkpoint", str(out / "final"), env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "vLLM" not in plain.stderr
    # Greedy decoding of the same float32 weights, the saved ones and those vLLM held after the last push:
    # both engines score the same (a near-tie may flip one prompt).
    # The accuracy inside the format is still near 0 after 2 steps; the answer anywhere is not (the base knows its sums).
    for column, key in (("greedy_accuracy", "accuracy"), ("answer_anywhere", "answer_anywhere")):
        assert abs(summary["eval_after"][key] - _column(plain.stdout, column)) <= 1 / 16 + 1e-9, column
    assert summary["eval_after"]["answer_anywhere"] >= 0.5, summary["eval_after"]


def _column(table: str, column: str) -> float:
    """The held-out row's value in `column` of `grpo eval`'s table."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())  # the first column is "data set", two words
    row = re.split(r"\s{2,}", next(line for line in lines if line.startswith("heldout")).strip())
    assert len(row) == len(header), (header, row)
    return float(row[header.index(column)])
