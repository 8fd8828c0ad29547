"""Tracking sinks: metrics.jsonl, and wandb (offline) / TensorBoard / MLflow / trackio through the
same Tracker, with per-step rollout tables and resume by run id. Real libraries, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from grpo.run.tracking import JsonlSink, make_tracker, rollout_table, wandb_mode
from tests.conftest import ROOT

ROOT = ROOT


def _rows(step: int) -> list[dict]:
    return [{"step": step, "group": g, "index": i, "prompt": "1+1?", "completion": f"c{step}-{g}-{i} | <b>x</b>",
             "answer": "2", "rewards": {"math_answer": float(i % 2), "format": None}, "reward": float(i % 2),
             "advantage": 0.5 - (i % 2), "finish_reason": "stop", "num_tokens": 5}
            for g in range(2) for i in range(2)]


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def test_jsonl_sink_writes_metrics_and_per_step_rollouts(tmp_path):
    sink = JsonlSink(tmp_path)
    sink.log({"train/loss": 0.5, "train/kl": float("nan")}, step=1)
    sink.log_rollouts(_rows(1), step=1)
    sink.log_rollouts(_rows(2), step=2)
    sink.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 1 and row["train/loss"] == 0.5 and row["train/kl"] is None
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step-000001.jsonl", "step-000002.jsonl"]
    assert len((tmp_path / "rollouts.jsonl").read_text().splitlines()) == 4  # first group of each step


def test_rollout_table_flattens_reward_functions():
    columns, data = rollout_table(_rows(3))
    assert columns[-2:] == ["reward/format", "reward/math_answer"]
    assert len(data) == 4 and data[1][-1] == 1.0 and data[1][-2] is None


def test_unknown_tracker_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="comet"):
        make_tracker(tmp_path, report_to=["comet"])


def test_wandb_offline_without_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_wandb_and_tensorboard_through_tracker_and_resume(tmp_path, offline_wandb):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    tracker = make_tracker(run_dir, report_to=["wandb", "tensorboard"], run_name="t",
                           config={"trainer": {"steps": 3}, "logging": {"report_to": ["wandb", "tensorboard"]}})
    for step in (1, 2):
        tracker.log({"train/loss": 1.0 / step, "reward/mean": None}, step)
        tracker.log_rollouts(_rows(step), step)
    ids = tracker.run_ids()
    tracker.close()
    assert set(ids) == {"wandb", "tensorboard"}

    # wandb: an offline run in run_dir/wandb, one table file per logged step (none overwritten).
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(offline) == 1 and (offline[0] / f"run-{ids['wandb']}.wandb").is_file()
    tables = sorted(p.name for p in offline[0].rglob("*.table.json"))
    assert any(n.startswith("step_000001") for n in tables) and any(n.startswith("step_000002") for n in tables), tables

    # TensorBoard: scalars and one rollouts text entry per step.
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    rollout_steps = [e.step for e in acc.Tensors("rollouts/text_summary")]
    assert rollout_steps == [1, 2]

    # Resume: the same wandb run id continues, in a second offline run folder with that id.
    resumed = make_tracker(run_dir, report_to=["wandb", "tensorboard"], resume_ids=ids)
    assert resumed.run_ids()["wandb"] == ids["wandb"]
    resumed.log({"train/loss": 0.25}, 3)
    resumed.close()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_mlflow_and_trackio_through_tracker(tmp_path):
    """In a subprocess: trackio reads TRACKIO_DIR when first imported."""
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    script = textwrap.dedent(f"""
        import json
        from grpo.run.tracking import make_tracker
        rows = {_rows(1)!r}
        t = make_tracker({str(tmp_path / 'run')!r}, report_to=["mlflow", "trackio"], run_name="r", config={{"a": {{"b": 1}}}})
        t.log({{"train/loss": 0.5}}, 1)
        t.log_rollouts(rows, 1)
        t.log_rollouts(rows, 2)
        ids = t.run_ids()
        t.close()
        t = make_tracker({str(tmp_path / 'run')!r}, report_to=["mlflow", "trackio"], resume_ids=ids)
        again = t.run_ids()
        t.log({{"train/loss": 0.25}}, 2)
        t.close()
        print("IDS", json.dumps([ids, again]))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ids, again = json.loads(out.stdout.split("IDS", 1)[1].splitlines()[0])
    assert ids == again and set(ids) == {"mlflow", "trackio"}
    tables = sorted(p.name for p in (tmp_path / "run" / "mlartifacts").rglob("step-*.json"))
    assert tables == ["step-000001.json", "step-000002.json"]
    assert (tmp_path / "trackio" / "grpo-zero.db").is_file()
