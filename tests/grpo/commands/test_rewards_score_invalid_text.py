"""`grpo score` on invalid text: a lone surrogate, NUL, invalid UTF-8 bytes and a 10 MB line.

The real CLI runs in a subprocess (`python -m grpo.commands.score`, the code behind `grpo score`): it must
exit 0, score every valid row, mark the bad ones (stderr, the summary, the output file) and write
valid UTF-8 JSON.
"""

import json
import subprocess
import sys

from tests.conftest import ROOT

ROOT = ROOT


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode("ascii")  # ascii: \\ud800 and \\u0000 stay JSON escapes


def test_invalid_text_never_stops_a_scoring_job(tmp_path):
    ok = "<think>3+4 is 7</think><answer>7</answer>"
    lines = [
        _line({"id": "good", "completion": ok, "answer": "7"}),
        _line({"id": "surrogate", "completion": ok + "\ud800", "answer": "7", "note": "x\udfffy"}),
        _line({"id": "nul-escape", "completion": "<answer>7</answer>\u0000", "answer": "7"}),
        b'{"id": "nul-raw", "completion": "<answer>7</answer>\x00 tail", "answer": "7"}\n',
        b'{"id": "bad-utf8", "completion": "<answer>7</answer> \xff\xfe", "answer": "7"}\n',
        _line({"id": "10mb", "completion": "x" * (10 * 1024 * 1024) + "<answer>7</answer>", "answer": "7"}),
        b"this is not json\n",
        _line(["a", "list"]),
        _line({"id": "no-completion", "answer": "7"}),
        _line({"id": "wrong", "completion": "<answer>8</answer>", "answer": "7"}),
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"".join(lines))
    p = subprocess.run([sys.executable, "-m", "grpo.commands.score", str(src), "--reward", "math_answer", "--out", str(out)],
                       cwd=ROOT, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    summary = json.loads(p.stdout.decode("utf-8").strip().splitlines()[-1])
    assert summary["n"] == 6 and summary["bad_rows"] == 4 and summary["repaired_rows"] == 1
    assert summary["errors"] == 0 and summary["timeouts"] == 0
    stderr = p.stderr.decode("utf-8")
    for lineno in (5, 7, 8, 9):
        assert f"in.jsonl:{lineno}:" in stderr
    text = out.read_bytes().decode("utf-8")  # strict: the output is valid UTF-8
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(lines)  # one output row per input row, in input order
    by_id = {r["id"]: r for r in rows if "id" in r}
    assert [by_id[k]["reward"] for k in ("good", "surrogate", "nul-escape", "nul-raw", "10mb", "wrong")] == [
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert by_id["surrogate"]["note"] == "x\ufffdy" and by_id["surrogate"]["completion"].endswith("\ufffd")
    marked = [r for r in rows if "error" in r]
    assert [r["line"] for r in marked] == [5, 7, 8, 9] and all(r["reward"] is None for r in marked)
    assert "UTF-8" in marked[0]["error"]


def test_scorer_scores_lone_surrogates_in_process_and_in_workers():
    """A training step hands the scorer raw completions: surrogates and NUL are scored, not raised."""
    from rewards import RewardSpec, Scorer

    completions = ["<answer>7</answer>\ud800", "\x00<answer>7</answer>", "<answer>8\udfff</answer>"]
    for workers in (0, 1):
        with Scorer([RewardSpec("math_answer"), RewardSpec("format")], workers=workers) as s:
            r = s.score(completions, [{"answer": "7"}] * 3)
        assert r.per_function["math_answer"] == [1.0, 1.0, 0.0], workers
        assert r.metrics["reward/math_answer/errors"] == 0.0 and r.metrics["reward/format/errors"] == 0.0
