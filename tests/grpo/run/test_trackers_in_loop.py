"""The tiny-cpu recipe with `logging.report_to: [wandb, tensorboard]`: an offline wandb run and a
TensorBoard event file are written, and a run resumed from its checkpoint continues the same wandb
run (its id is stored in the checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("wandb", reason="wandb not installed (pip install -e '.[dev]')")
pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install -e '.[dev]')")


def _wandb_run_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("**/offline-run-*") if p.is_dir()}


def test_wandb_and_tensorboard_from_a_cpu_run_and_resume_keeps_the_wandb_run(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # no network here; offline-by-default is tested in test_tracking
    common = ["recipes/tiny-cpu.yaml", "logging.report_to=[wandb, tensorboard]", "trainer.save_every=2",
              "eval.num_prompts=4", "logging.progress=false", "--output-dir", str(out)]
    first = run_cli("train", *common, "trainer.steps=2", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = _wandb_run_ids(out)
    assert len(ids) == 1, sorted((out / "wandb").glob("**/*"))
    assert list((out / "tensorboard").glob("**/events.out.tfevents.*"))

    second = run_cli("train", *common, "trainer.steps=4", "--resume", "auto", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _wandb_run_ids(out) == ids  # the resumed process logged into the same wandb run
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
