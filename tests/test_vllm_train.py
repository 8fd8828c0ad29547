"""The tiny-cpu recipe with `rollout.engine=vllm`: the real CLI in a subprocess, vLLM's CPU build.

`grpo train` samples every rollout and runs both held-out evaluations with the colocated vLLM engine
(weights pushed after every step), then `grpo eval` evaluates the final model with the recipe's
engine. A broken engine path fails here: a start-up error, a weight sync that raises, or an eval
that silently falls back to the transformers engine (the engine's log line is checked).
"""

from __future__ import annotations

import json

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

    evaluated = run_cli("eval", "recipes/tiny-cpu.yaml", "rollout.engine=vllm", "eval.num_prompts=16",
                        "--checkpoint", str(out / "final"), env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "vLLM has no sleep mode on platform cpu" in evaluated.stderr  # built by the vLLM engine
    plain = run_cli("eval", "recipes/tiny-cpu.yaml", "eval.num_prompts=16", "--checkpoint", str(out / "final"), env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "vLLM" not in plain.stderr
    # Greedy decoding of the same float32 weights: both engines score the same (a near-tie may flip one prompt).
    assert abs(_accuracy(evaluated.stdout) - _accuracy(plain.stdout)) <= 1 / 16 + 1e-9


def _accuracy(table: str) -> float:
    """The held-out greedy accuracy from `grpo eval`'s table."""
    lines = table.splitlines()
    header = lines[0].split()
    row = next(line for line in lines if line.startswith("heldout")).split()
    return float(row[header.index("greedy_accuracy")])
