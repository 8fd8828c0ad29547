"""Resume checks before it trusts (grpo/run/checkpoint.py, grpo/run/train.py:check_restart): a damaged
newest checkpoint is passed over for an intact older one, a recipe that changed what the weights
were trained with is refused by key, a finished run is not trained again, a run directory without
a checkpoint is not overwritten, stale temporary directories are removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT

ROOT = ROOT
SHORT = ["trainer.threads=1", "trainer.prompts_per_step=2", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0"]


def grpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture()
def cli(capsys, caplog):
    """`grpo ARGS` in this process (faster than a subprocess): its exit status, and what it printed
    and logged."""
    import logging

    from grpo.cli import main

    def run(*args: str) -> SimpleNamespace:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code = main(list(args))
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err + caplog.text)

    return run


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("resume") / "run"
    r = grpo("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=4", "trainer.save_every=2",
             "trainer.keep_checkpoints=5", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture()
def run4(tmp_path, finished_run):
    """A finished 4-step run with checkpoints after steps 2 and 4 (a copy of one run per test)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_finished_run_is_not_trained_again_and_a_changed_recipe_is_refused_by_key(run4, cli):
    summary = (run4 / "summary.json").read_bytes()
    final = (run4 / "final" / "model.safetensors").stat().st_mtime_ns
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=4", "--output-dir", str(run4), "--resume", "auto")
    assert r.returncode == 0 and "already finished" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (run4 / "summary.json").read_bytes() == summary
    assert (run4 / "final" / "model.safetensors").stat().st_mtime_ns == final
    assert steps(run4) == [1, 2, 3, 4]
    # a different group size is refused, naming the key and both values; nothing is rewritten
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "rollout.group_size=8", "trainer.steps=6",
             "--output-dir", str(run4), "--resume", "auto")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "rollout.group_size: 4 in the checkpoint, 8 now" in r.stderr and "--allow-change" in r.stderr
    assert steps(run4) == [1, 2, 3, 4] and (run4 / "summary.json").read_bytes() == summary
    # fewer steps than the checkpoint took
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=3", "--output-dir", str(run4),
             "--resume", str(run4 / "checkpoints" / "step-000004"))
    assert r.returncode == 2 and "trainer.steps=3 is below the checkpoint's step 4" in r.stderr, r.stderr[-2000:]
    # run length may change: train on to step 6 from the step-4 checkpoint; --allow-change accepts a key
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=6", "trainer.lr=1e-4", "--allow-change",
             "trainer.lr", "--output-dir", str(run4), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps(run4) == [1, 2, 3, 4, 5, 6]


def test_a_damaged_newest_checkpoint_is_passed_over_for_an_intact_one(run4, cli):
    newest = run4 / "checkpoints" / "step-000004"
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    stale = run4 / "checkpoints" / ".tmp-step-000006-x"
    (stale / "model").mkdir(parents=True)
    (run4 / "summary.json").unlink()  # as if the run had died after step 4
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=4", "trainer.save_every=2",
             "trainer.keep_checkpoints=5", "--output-dir", str(run4), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step-000004 is damaged (model/model.safetensors has" in r.stderr and "older one" in r.stderr
    assert "resuming from " in r.stderr and "step-000002, the newest intact checkpoint" in r.stderr
    assert steps(run4) == [1, 2, 3, 4]  # steps 3-4 again, from the step-2 checkpoint
    assert not stale.exists()
    # asked for by path, a damaged checkpoint is an error that says what is wrong
    assert (newest / "optimizer.pt").is_file()  # rewritten, intact, by the resumed run
    (newest / "optimizer.pt").unlink()
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=6", "--output-dir", str(run4),
             "--resume", str(newest))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{newest}: damaged checkpoint: optimizer.pt is missing" in r.stderr


def test_a_run_without_checkpoints_is_not_overwritten_by_resume(tmp_path, tiny_base, cli):
    out = tmp_path / "run"
    assert cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=2", "--output-dir", str(out)).returncode == 0
    (out / "summary.json").unlink()  # died before the end, with checkpoints off
    r = cli("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=2", "--output-dir", str(out), "--resume", "auto")
    assert r.returncode == 2 and "no checkpoint to resume from" in r.stderr and "Traceback" not in r.stderr
    assert steps(out) == [1, 2]
