"""`grpo score` in a subprocess, entry-point plugins, and error counting that reaches metrics.jsonl."""

import json
import subprocess
import sys

import pytest

from rewards import RewardSpec, Scorer, known_reward_names, resolve
from tests.conftest import ROOT

ROOT = ROOT


def _run_score(*args):
    return subprocess.run([sys.executable, "-m", "grpo.commands.score", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_grpo_score_math_answer(tmp_path):
    src = tmp_path / "c.jsonl"
    rows = [
        {"id": "a", "completion": "<think>3+4 is 7</think><answer>7</answer>", "gold": "7"},
        {"id": "b", "completion": "<think>...</think><answer>\\frac{1}{2}</answer>", "gold": "0.5"},
        {"id": "c", "completion": "<think>no</think><answer>8</answer>", "gold": "7"},
        {"id": "d", "completion": "<answer>9^{9^{9^{9}}}</answer>", "gold": "7"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.jsonl"
    p = _run_score(str(src), "--reward", "math_answer", "--gold-field", "gold", "--out", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary) == {"n", "mean", "timeouts", "errors", "seconds"}
    assert summary["n"] == 4 and summary["mean"] == 0.5 and summary["timeouts"] == 0 and summary["errors"] == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 1.0, 0.0, 0.0]
    assert scored[0]["id"] == "a"


def test_grpo_score_countdown_and_unknown_reward(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"completion": "<answer>(3 + 4) * 2</answer>", "target": 14, "numbers": [2, 3, 4]}) + "\n")
    p = _run_score(str(src), "--reward", "countdown", "--workers", "0")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["mean"] == 1.0
    p = _run_score(str(src), "--reward", "no_such_reward")
    assert p.returncode == 2 and "math_answer" in p.stderr


@pytest.fixture
def entry_point(tmp_path, monkeypatch):
    """A throwaway installed distribution that declares a reward in the grpo_zero.rewards group."""
    dist = tmp_path / "fake_reward_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-reward-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[grpo_zero.rewards]\nlength_reward = tests.rewards_plugins:async_len\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    resolve.cache_clear()
    yield "length_reward"
    resolve.cache_clear()


def test_entry_point_reward_resolves_and_runs_in_workers(entry_point):
    assert entry_point in known_reward_names()
    with Scorer([RewardSpec(entry_point)], workers=1) as s:
        r = s.score(["abcd"], [{}])
    assert r.per_function[entry_point] == [4.0]


def test_errors_from_a_plugin_reach_metrics_jsonl(tmp_path):
    """A reward that raises on one sample in ten: the run goes on and metrics.jsonl counts the errors."""
    from grpo.run.tracking import JsonlSink

    sink = JsonlSink(tmp_path)
    name = "tests.rewards_plugins:raises_on_tenth"
    with Scorer([RewardSpec("format", 1.0), RewardSpec(name, 1.0)], workers=2) as s:
        for step in range(3):
            n = 20
            res = s.score(["<think>x</think><answer>1</answer>"] * n, [{"i": step * n + i} for i in range(n)],
                          [{"sample_id": f"{step}-{i}"} for i in range(n)])
            sink.log(res.metrics, step)
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line[f"reward/{name}/errors"] for line in lines] == [2.0, 2.0, 2.0]
    assert all(line["reward/format"] == 1.0 for line in lines)


def test_score_add_parser_wires_into_a_cli(tmp_path, capsys):
    import argparse

    from grpo.commands import score

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"completion": "<think>x</think><answer>7</answer>", "answer": "7"}) + "\n")
    parser = argparse.ArgumentParser(prog="grpo")
    score.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", str(src), "--reward", "format", "--workers", "0"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean"] == 1.0
