"""Every user error is one line that names the file, row or key, exit status 2, no traceback, and
nothing written (grpo/errors.py, the one boundary of the verbs): bad data, bad models, a Hub name
with no network, a full disk. `grpo -v` adds the traceback."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest

from grpo.cli import main

RUN = ["trainer.steps=1", "trainer.threads=1", "trainer.prompts_per_step=2", "rollout.group_size=2",
       "eval.before_and_after=false", "eval.num_prompts=0", "logging.progress=false", "rewards.workers=0"]
GOOD = [{"question": f"{i}+1", "answer": str(i + 1)} for i in range(8)]


def write_jsonl(path: Path, rows: list, extra: bytes = b"", at: int = 1) -> Path:
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(at, extra)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run_train(tmp_path, capsys, *overrides) -> tuple[int, str]:
    out = tmp_path / "run"
    code = main(["train", "recipes/tiny-cpu.yaml", *RUN, *overrides, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", b'{"question": "1+1", "answer": ', "row 2: not valid JSON"),
    ("latin1.jsonl", '{"question": "caf\xe9", "answer": "1"}'.encode("latin-1"), "row 2: not valid UTF-8"),
    ("huge.jsonl", json.dumps({"question": "x" * 1_500_000, "answer": "1"}).encode(), "row 2: longer than 1,000,000"),
])
def test_bad_rows_are_named_by_file_and_row(tmp_path, capsys, caplog, tiny_base, name, content, message):
    data = write_jsonl(tmp_path / name, GOOD, content)
    code, err = run_train(tmp_path, capsys, f"data.source={data}")
    assert code == 2 and f"{data}: {message}" in err and "data.skip_bad_rows" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    # skip_bad_rows covers them: the row is skipped and counted, the run goes on
    code, err = run_train(tmp_path / "skip", capsys, f"data.source={data}", "data.skip_bad_rows=true")
    assert code == 0 and "skipped 1 bad row(s) of 9" in caplog.text, err


@pytest.mark.parametrize("make,message", [
    (lambda d: (d / "x.parquet").write_bytes(b"not parquet at all") and d / "x.parquet", "not a readable parquet file"),
    (lambda d: d / "missing.jsonl", "data file not found"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "empty directory (no data files)"),
])
def test_unreadable_data_sources(tmp_path, capsys, tiny_base, make, message):
    source = make(tmp_path)
    code, err = run_train(tmp_path, capsys, f"data.source={source}")
    assert code == 2 and message in err and str(source) in err, err


def _copy_base(tiny_base, dst: Path) -> Path:
    shutil.copytree(tiny_base, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    (lambda m: (m / "config.json").write_text("{not json"), "is not a valid JSON file"),
    (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:1000]),
     "Error while deserializing header"),
])
def test_a_broken_model_directory_is_named(tmp_path, capsys, tiny_base, damage, message):
    model = _copy_base(tiny_base, tmp_path / "model")
    damage(model)
    code, err = run_train(tmp_path, capsys, f"model.name_or_path={model}")
    assert code == 2 and str(model) in err and message in err, err


def test_a_missing_local_model_and_an_unreachable_hub_fail_at_once(tmp_path, capsys, monkeypatch):
    code, err = run_train(tmp_path, capsys, f"model.name_or_path={tmp_path / 'no' / 'such' / 'model'}")
    assert code == 2 and "no such model directory" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import grpo.hub

    monkeypatch.setattr(grpo.hub, "PROBE_S", 2.0)
    t = time.monotonic()
    code, err = run_train(tmp_path / "hub", capsys, "model.name_or_path=grpo-zero-tests/not-cached-anywhere")
    assert code == 2 and "could not be reached" in err and "grpo-zero-tests/not-cached-anywhere" in err, err
    assert time.monotonic() - t < 15


def test_verbose_adds_the_traceback(tmp_path, capsys, tiny_base):
    data = write_jsonl(tmp_path / "bad.jsonl", GOOD, b"{")
    code = main(["-v", "train", "recipes/tiny-cpu.yaml", *RUN, f"data.source={data}", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "row 2: not valid JSON" in err


def test_a_full_disk_while_checkpointing_is_named_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import torch

    from grpo.errors import describe
    from grpo.run import checkpoint
    from tests.grpo.run.test_checkpoint import _tiny_model_and_friends

    model, tok, opt, sched = _tiny_model_and_friends()
    real_save = torch.save

    def full_disk(obj, path, *a, **k):  # what torch.save raises when the disk fills up
        if str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError) as info:
        checkpoint.save(tmp_path, checkpoint.TrainState(step=3), model=model, unwrapped=model, tokenizer=tok,
                        optimizer=opt, scheduler=sched, keep_last=2, is_main=True)
    assert info.value.errno == errno.ENOSPC
    message = describe(info.value)
    assert message.startswith("no space left on device") and "step-000003" in message and str(tmp_path) in message
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no partial checkpoint, no temporary directory


def test_a_long_prompt_is_dropped_before_it_is_tokenised():
    from grpo.config import DataConfig
    from grpo.data.sources import filter_long_prompts
    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    seen = []
    real_call = type(tok).__call__

    class Counting(type(tok)):
        def __call__(self, texts, *a, **k):
            seen.extend(len(t) for t in texts)
            return real_call(self, texts, *a, **k)

    tok.__class__ = Counting
    cfg = DataConfig(max_prompt_tokens=64)
    rows = [{"question": "1+1", "answer": "2"}, {"question": "9" * 900_000, "answer": "1"}]
    kept, dropped = filter_long_prompts(rows, cfg, tok)
    assert kept == rows[:1] and dropped == 1
    assert seen and max(seen) < 1000  # the 900k-character prompt never reached the tokenizer


def test_a_hub_data_set_that_cannot_be_reached_fails_in_seconds(tmp_path, capsys, tiny_base, monkeypatch):
    import grpo.hub

    monkeypatch.setattr(grpo.hub, "PROBE_S", 2.0)
    t = time.monotonic()
    code, err = run_train(tmp_path, capsys, "data.source=grpo-zero-tests/no-such-data-set")
    assert code == 2 and "grpo-zero-tests/no-such-data-set [train]: the data set could not be loaded" in err, err
    assert time.monotonic() - t < 15
