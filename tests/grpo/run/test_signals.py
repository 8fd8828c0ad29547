"""SIGTERM (a scheduler's notice before preemption) and SIGINT (Ctrl-C) stop `grpo train` after
the step in progress, with a checkpoint when checkpoints are on, one line and the conventional
exit status (128 + the signal); the run then resumes to the weights an uninterrupted run ends on.
The real CLI in a subprocess, its own process group (a terminal's Ctrl-C reaches the whole group)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

ROOT = ROOT
ARGS = ["train", "recipes/tiny-cpu.yaml", "trainer.threads=1", "trainer.prompts_per_step=4", "rollout.group_size=4",
        "eval.before_and_after=false", "logging.progress=false", "trainer.steps=12", "trainer.keep_checkpoints=10"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line)["step"] for line in text.splitlines() if line.strip()]


def interrupt(args: list[str], out: Path, signum: int, after_step: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start the run, send `signum` to its process group once `after_step` is logged (plus a random
    moment inside the next step); returns the result and the seconds from the signal to the exit."""
    proc = subprocess.Popen([sys.executable, "-m", "grpo", *args, "--output-dir", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while len(logged_steps(out)) < after_step:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.2))
    sent = time.time()
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.time() - sent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("signals") / "whole"
    r = subprocess.run([sys.executable, "-m", "grpo", *ARGS, "trainer.save_every=4", "rewards.workers=0",
                        "--output-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_to_the_same_weights(tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = [*ARGS, "trainer.save_every=4", "rewards.workers=0"]
    r, seconds = interrupt(args, out, signal.SIGTERM, after_step=random.Random().randint(2, 8))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = logged_steps(out)[-1]
    assert f"SIGTERM received: stopped after step {last} of 12" in r.stderr and "--resume auto" in r.stderr
    assert seconds < 10  # one tiny step and a checkpoint
    from grpo.run.checkpoint import latest, load_state

    assert load_state(latest(out)).step == last  # the checkpoint of the last finished step
    resumed = subprocess.run([sys.executable, "-m", "grpo", *args, "--output-dir", str(out), "--resume", "auto"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 13))
    whole, mine = final_weights(uninterrupted), final_weights(out)
    assert whole.keys() == mine.keys() and all(torch.equal(whole[k], mine[k]) for k in whole)


def test_ctrl_c_is_one_line_from_the_whole_process_group_and_says_no_checkpoint_is_written(tmp_path, tiny_base):
    """SIGINT to the group (trainer and its sandboxed reward workers, as a terminal sends it):
    exit 130, one line, no traceback from any process; with checkpoints off the line says so."""
    out = tmp_path / "run"
    r, seconds = interrupt([*ARGS, "rewards.workers=1"], out, signal.SIGINT, after_step=3)
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("grpo:")]
    assert len(lines) == 1 and "SIGINT received" in lines[0] and "no checkpoint written" in lines[0], lines
    assert seconds < 10
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
