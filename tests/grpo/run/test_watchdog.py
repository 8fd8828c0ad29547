"""The watchdog (grpo/run/watchdog.py): a stalled process is named with its phase, rank and stacks,
the run stops with exit status 5 and resumes; disk-full errors wrapped by libraries are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpo import phases
from tests.conftest import ROOT, run_cli

SHORT = ["trainer.threads=1", "trainer.prompts_per_step=4", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0"]
PLANT = Path(__file__).parent / "plant"  # its sitecustomize.py plants the stall (GRPO_TEST_STALL)


# --- the watchdog on its own ----------------------------------------------------------------------


def test_a_stall_is_named_once_with_its_phase_step_and_every_threads_stack(tmp_path, capsys):
    from grpo.run.watchdog import Watchdog

    dog = Watchdog(tmp_path, warn_s=5, stop_s=None)
    dog.dir.mkdir(parents=True)
    dog.check(phases.Now("learn", 3.0, 7, 3.0))  # below the threshold: nothing said
    assert capsys.readouterr().err == ""
    dog.check(phases.Now("learn", 6.0, 7, 6.0))
    dog.check(phases.Now("learn", 7.0, 7, 7.0))  # the same stall: said once
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "trainer has made no progress in phase 'learn' for 6 s (step 7; trainer.stall_warn_s=5)" in err[0]
    stacks = Path(err[0].rsplit(": ", 1)[1])
    text = stacks.read_text()
    assert stacks.parent == tmp_path / "watchdog" and "Current thread" in text
    assert "test_a_stall_is_named_once" in text  # every thread's Python stack, this one's included
    event = json.loads((tmp_path / "watchdog/events.jsonl").read_text())
    assert event["kind"] == "stall" and event["phase"] == "learn" and event["step"] == 7
    dog.check(phases.Now("learn", 1.0, 8, 1.0))  # progress, then a new stall: said again
    dog.check(phases.Now("learn", 6.0, 8, 6.0))
    assert "step 8" in capsys.readouterr().err


def test_a_rank_waiting_in_a_collective_names_the_rank_that_stalled(tmp_path, capsys):
    from grpo.run.watchdog import Watchdog

    waiting = Watchdog(tmp_path, warn_s=5, stop_s=None, rank=0, world=2)
    stalled = Watchdog(tmp_path, warn_s=5, stop_s=None, rank=1, world=2)
    waiting.dir.mkdir(parents=True)
    stalled.check(phases.Now("learn", 9.0, 4, 9.0))  # its heartbeat file, then its own line
    capsys.readouterr()
    waiting.check(phases.Now("collective", 8.0, 4, 8.0))
    err = capsys.readouterr().err
    assert "trainer rank 0 has made no progress in phase 'collective'" in err
    assert "trainer rank 1 is stalled in phase 'learn' for 9 s" in err


def test_phases_nest_and_beats_are_progress():
    with phases.phase("learn"):
        with phases.phase("collective"):
            assert phases.now().phase == "collective"
        assert phases.now().phase == "learn"
        time.sleep(0.05)
        assert phases.now().idle_s >= 0.05
        phases.beat()
        assert phases.now().idle_s < 0.05
    assert phases.now().phase == "idle"


def test_phase_spans_are_recorded_once_per_step_nested_ones_too_and_short_ones_dropped(tmp_path, monkeypatch):
    path = tmp_path / "timeline" / "trainer-rank1.jsonl"
    phases.record_to(path, "trainer", 1)
    try:
        phases.set_step(3)
        with phases.phase("learn"):
            with phases.phase("collective"):
                time.sleep(0.01)
            with phases.phase("score"):
                pass  # under MIN_SPAN_S: dropped
        assert not path.exists()  # buffered until the step moves on
        phases.set_step(4)
        spans = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(s["phase"], s["step"], s["role"], s["rank"]) for s in spans] == [("collective", 3, "trainer", 1),
                                                                                  ("learn", 3, "trainer", 1)]
        assert spans[1]["start"] <= spans[0]["start"] < spans[0]["end"] <= spans[1]["end"]
        assert abs(spans[1]["end"] - time.time()) < 5  # wall clock
        monkeypatch.setattr(phases, "MAX_TIMELINE_BYTES", 2000)  # bounded: the older half is cut
        for step in range(5, 60):
            phases.set_step(step)
            with phases.phase("generate"):
                time.sleep(0.0012)
        assert path.stat().st_size <= 2000 + 200
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
        assert steps[-1] == 58 and steps[0] > 5
    finally:
        phases.record_to(None)
        phases.set_step(0)
    assert json.loads(path.read_text().splitlines()[-1])["step"] == 59  # the last step written on the way out


# --- planted stalls in real runs ----------------------------------------------------------------


def _planted(stall: str, mark: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{PLANT}{os.pathsep}{ROOT}", "GRPO_TEST_STALL": stall,
           "GRPO_TEST_STALL_MARK": str(mark)}
    return subprocess.Popen([sys.executable, "-m", "grpo", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _read_lines(proc: subprocess.Popen) -> list[tuple[float, str]]:
    """stderr lines with the time each arrived (a thread reads them as they come)."""
    lines: list[tuple[float, str]] = []

    def pump():
        for line in proc.stderr:
            lines.append((time.time(), line))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_a_hung_generation_is_named_then_stops_the_run_which_resumes_with_every_step_once(tmp_path, tiny_base):
    out, mark = tmp_path / "run", tmp_path / "hung"
    args = ["train", "recipes/tiny-cpu.yaml", "trainer.steps=3", "trainer.save_every=1", *SHORT,
            "trainer.stall_warn_s=2", "trainer.stall_stop_s=6", "--output-dir", str(out)]
    proc = _planted("generate:3", mark, *args)  # step 3's generate never returns
    lines = _read_lines(proc)
    assert proc.wait(timeout=300) == 5, "".join(line for _, line in lines)[-3000:]
    hung_at = float(mark.read_text().split()[0])
    warned = [(t, line) for t, line in lines if "has made no progress in phase 'generate'" in line]
    assert len(warned) == 1, lines
    t_warn, line = warned[0]
    assert t_warn - hung_at <= 2 + 10 and "(step 3; trainer.stall_warn_s=2)" in line
    stacks = Path(line.rsplit(": ", 1)[1].strip())
    assert stacks.is_file() and "wrapper" in stacks.read_text()  # the planted frame, where it hangs
    stopped = [line for _, line in lines if line.startswith("grpo: stopped:")]
    assert len(stopped) == 1 and "phase 'generate'" in stopped[0] and "step-000002" in stopped[0]
    assert "--resume auto" in stopped[0]
    assert not any("Traceback" in line for _, line in lines)

    result = run_cli(*args, "--resume", "auto")  # no plant: the run finishes
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no progress" not in result.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_two_processes_the_line_names_the_rank_that_stalled_in_its_update(tmp_path, tiny_base):
    out, mark = tmp_path / "run", tmp_path / "stalled"
    proc = _planted("learn:2:1", mark, "train", "recipes/tiny-cpu.yaml", "trainer.steps=3", *SHORT,
                    "trainer.stall_warn_s=3", "trainer.stall_stop_s=12", "--output-dir", str(out),
                    "--accelerate-config", "cpu-2proc")
    lines = _read_lines(proc)
    code = proc.wait(timeout=300)
    text = "".join(line for _, line in lines)
    assert code != 0, text[-3000:]
    assert mark.read_text().split()[1] == "1"  # the plant fired on rank 1
    assert "trainer rank 1 has made no progress in phase 'learn'" in text, text[-3000:]
    waiting = [line for _, line in lines if "trainer rank 0 has made no progress in phase 'collective'" in line]
    assert waiting and "trainer rank 1 is stalled in phase 'learn'" in waiting[0], text[-3000:]


# --- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (needs root, as on CI's machines; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(small_disk, tiny_base):
    out = small_disk / "run"
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=6", "trainer.save_every=1",
                     "trainer.keep_checkpoints=6", *SHORT, "--output-dir", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("grpo: error: no space left on device") and "checkpoint" in line, result.stderr[-2000:]
    from grpo.run import checkpoint

    kept = checkpoint.latest(out)
    assert kept is not None and checkpoint.damage(kept) is None  # the last whole checkpoint is intact
    assert not list((out / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind


def test_library_wrapped_disk_full_errors_are_recognised_by_their_cause(tmp_path):
    from grpo.errors import describe

    class SafetensorError(Exception):  # safetensors' Rust error type wraps the OSError in its text
        pass

    assert describe(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "x.pt"))
        except OSError as exc:
            raise wrapped from exc
    except RuntimeError as exc:
        line = describe(exc)
    assert line.startswith("no space left on device (") and str(tmp_path) in line
    assert describe(RuntimeError("unexpected pos 576 vs 534")) is None  # no cause, no path: not a disk error
