"""Data loading: every source kind with local files, field mapping, bad rows, templates, filtering."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from grpo.config import DataConfig, EvalSet, RunConfig
from grpo.data.prompts import (
    TEMPLATES,
    PromptSampler,
    prompt_prefills_think,
    render_prompt,
    render_prompts,
    template_fields,
)
from grpo.data.sources import DataError, LoadStats, load_eval_sets, load_rows, read_rows
from grpo.data.tasks import CountdownTask

ROWS = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(20)]


def _data(source, **kw) -> DataConfig:
    fields = {"prompt_field": "problem", "answer_field": "solution", "template": "r1_zero", **kw}
    return DataConfig(source=str(source), **fields)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    out["json"] = tmp_path / "d.json"
    out["json"].write_text(json.dumps(ROWS), encoding="utf-8")
    out["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
    out["csv"] = tmp_path / "d.csv"
    out["csv"].write_text("problem,solution\n" + "".join(f"\"{r['problem']}\",{r['solution']}\n" for r in ROWS))
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_each_local_file_kind_loads_the_same_rows(files, kind):
    rows, stats = read_rows(_data(files[kind]))
    assert stats.rows_read == 20 and stats.bad_rows == 0
    assert rows == [{"question": r["problem"], "answer": r["solution"]} for r in ROWS]


def test_datasets_directories_save_to_disk_and_data_files(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:3])}).save_to_disk(str(saved))
    rows, _ = read_rows(_data(saved, split="test"))
    assert [r["answer"] for r in rows] == ["0", "2", "4"]
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS[:5]).save_to_disk(str(single))
    assert len(read_rows(_data(single))[0]) == 5
    with pytest.raises(DataError, match="no split 'validation'"):
        read_rows(_data(saved, split="validation"))
    # a folder of data files named by split, as on the Hub
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:7])
    write_jsonl(folder / "test.jsonl", ROWS[:2])
    assert len(read_rows(_data(folder))[0]) == 7
    assert len(read_rows(_data(folder, split="test"))[0]) == 2


def test_hub_name_goes_to_load_dataset_with_config_split_revision(monkeypatch):
    """Fake: nothing can be downloaded here, so `datasets.load_dataset` is replaced to record the call."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list(ROWS[:4])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = _data("HuggingFaceH4/MATH-500", split="test", revision="abc123")
    rows, _ = read_rows(cfg)
    assert calls == [("HuggingFaceH4/MATH-500", None, "test", "abc123")] and len(rows) == 4
    with pytest.raises(DataError, match=r"org/name \[train\]: row 1: field 'question' is missing \(fields: \['problem', 'solution'\]\)"):
        read_rows(_data("org/name", prompt_field="question"))


def test_bad_row_error_names_file_and_row(tmp_path):
    bad = ROWS[:3] + [{"problem": "no answer here"}] + ROWS[3:5] + [{"problem": ["a", "list"], "solution": "1"}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError) as err:
        read_rows(_data(path))
    message = str(err.value)
    assert str(path) in message and "row 4" in message and "'solution' is missing" in message
    assert "skip_bad_rows" in message
    # a mistyped field; a CSV row number counts data rows after the header
    typed = write_jsonl(tmp_path / "typed.jsonl", ROWS[:6] + [{"problem": ["a", "list"], "solution": "1"}])
    with pytest.raises(DataError, match=r"typed\.jsonl: row 7: field 'problem' must be non-empty text, got list"):
        read_rows(_data(typed))
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("problem,solution\nq1,1\nq2,\n")
    with pytest.raises(DataError, match=r"bad\.csv: row 2: field 'solution' is empty"):
        read_rows(_data(csv_path))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2: not valid JSON"):
        read_rows(_data(broken))


def test_bad_rows_skipped_and_counted_when_asked(tmp_path):
    bad = ROWS[:3] + [{"problem": "x"}, {"problem": None, "solution": "1"}, "not an object"] + ROWS[3:6]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    cfg = _data(path, skip_bad_rows=True)
    rows, stats = read_rows(cfg, skip_bad_rows=True)
    assert (len(rows), stats.rows_read, stats.bad_rows) == (6, 9, 3)
    assert "row 4" in stats.first_bad
    stats = LoadStats()
    train, heldout = load_rows(cfg, 2, stats=stats)
    assert (len(train), len(heldout), stats.bad_rows) == (4, 2, 3)


def test_field_mapping_with_extra_fields_for_countdown(tmp_path):
    path = write_jsonl(tmp_path / "cd.jsonl", [{"nums": [3, 5, 7], "target": 22}, {"nums": [2, 4], "target": "8"}])
    cfg = DataConfig(source=str(path), template="countdown", prompt_field=None, answer_field=None,
                     extra_fields={"numbers": "nums", "target": "target"})
    rows, _ = read_rows(cfg, needed=template_fields("countdown"))
    assert rows == [{"numbers": [3, 5, 7], "target": 22}, {"numbers": [2, 4], "target": 8}]
    prompt = render_prompt("countdown", rows[0])
    assert "3, 5, 7" in prompt and "22" in prompt and prompt_prefills_think(prompt)
    with pytest.raises(DataError, match="needs row key"):
        read_rows(cfg.model_copy(update={"extra_fields": {}}), needed=template_fields("countdown"))


def test_templates_r1_zero_and_qwen_boxed():
    row = {"question": "What is 2+3?", "answer": "5"}
    r1 = render_prompt("r1_zero", row)
    assert r1.startswith("A conversation between User and Assistant.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1
    assert r1.endswith("User: What is 2+3?. Assistant:")
    boxed = render_prompt("qwen_math_boxed", row)
    assert "\\boxed{}" in boxed and boxed.endswith("<|im_start|>assistant\n") and "What is 2+3?" in boxed
    assert render_prompt("r1_zero_tiny", {"question": "12+3"}).startswith("User: 12+3=?")
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt("nope", row)
    assert {"question"} == template_fields("r1_zero") == template_fields("qwen_math_boxed")
    assert set(TEMPLATES) >= {"r1_zero", "qwen_math_boxed", "r1_zero_tiny", "countdown"}


def _chat_tokenizer(template: str):
    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = template
    return tok


def test_chat_template_mode_and_think_prefill():
    plain = _chat_tokenizer("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}Assistant:{% endif %}")
    prefill = _chat_tokenizer("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}Assistant: <think>\n{% endif %}")
    cfg = DataConfig(template="chat", chat_instruction="Answer in <answer></answer>.")
    row = {"question": "2+2", "answer": "4"}
    (p1,) = render_prompts(cfg, [row], plain)
    (p2,) = render_prompts(cfg, [row], prefill)
    assert p1 == "User: 2+2\nAnswer in <answer></answer>.\nAssistant:" and not prompt_prefills_think(p1)
    assert p2.endswith("<think>\n") and prompt_prefills_think(p2)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompts(cfg, [row], None)


def test_prompt_length_filter_drops_long_prompts(tmp_path):
    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    rows = [{"problem": "1+" * n + "1", "solution": str(n + 1)} for n in range(1, 41)]
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", rows)), prompt_field="problem",
                     answer_field="solution", template="r1_zero_short", max_prompt_tokens=100)
    stats = LoadStats()
    train, heldout = load_rows(cfg, 5, tok, stats=stats)
    lengths = [len(tok.encode(p, add_special_tokens=False)) for p in render_prompts(cfg, train + heldout)]
    assert max(lengths) <= 100 and stats.too_long > 0 and len(train) + len(heldout) + stats.too_long == 40


def test_seeded_shuffle_split_is_deterministic_and_disjoint(files):
    a_train, a_eval = load_rows(_data(files["jsonl"], seed=3), 5)
    b_train, b_eval = load_rows(_data(files["parquet"], seed=3), 5)
    c_train, c_eval = load_rows(_data(files["jsonl"], seed=4), 5)
    assert (a_train, a_eval) == (b_train, b_eval) and a_eval != c_eval
    assert not {r["question"] for r in a_train} & {r["question"] for r in a_eval}
    assert len(a_train) == 15


def test_sampler_epochs_cover_every_row_once_per_epoch():
    rows = [{"question": str(i), "answer": str(i)} for i in range(10)]
    sampler = PromptSampler(rows, seed=1)
    first, second = sampler.next_batch(10), sampler.next_batch(10)
    assert sorted(r["question"] for r in first) == sorted(r["question"] for r in second) == sorted(map(str, range(10)))
    assert first != second and sampler.epoch == 1
    resumed = PromptSampler(rows, seed=1, epoch=1, position=4)
    assert resumed.next_batch(3) == second[4:7]


def test_countdown_task_problems_are_solvable_and_split_disjoint():
    task = CountdownTask(num_problems=500)
    train, heldout = task.split(50, seed=0)
    assert len(train) == 450 and len(heldout) == 50
    for row in train + heldout:
        # the generator's own solution: numbers used once each, value equals the target
        assert sorted(int(x) for x in re.findall(r"\d+", row["answer"])) == sorted(row["numbers"])
        assert _value(row["answer"]) == row["target"] and 1 <= row["target"] <= task.max_target
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in heldout}
    assert task.split(50, seed=0) == (train, heldout)


def _value(expr: str) -> Fraction:
    """Exact value of a generated + - * / expression (a tiny recursive-descent parser, no eval)."""
    tokens = re.findall(r"\d+|[-+*/()]", expr)
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            v = add()
            pos += 1
            return v
        return Fraction(int(tok))

    def mul():
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] in "*/":
            op = tokens[pos]
            pos += 1
            v = v * atom() if op == "*" else v / atom()
        return v

    def add():
        nonlocal pos
        v = mul()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            v = v + mul() if op == "+" else v - mul()
        return v

    return add()


def test_builtin_countdown_source_and_eval_sets(tmp_path):
    cfg = RunConfig.model_validate({
        "data": {"source": "countdown", "template": "r1_zero_short",
                 "countdown": {"min_numbers": 2, "max_numbers": 3, "num_problems": 300}},
        "eval": {"num_prompts": 20, "datasets": [{"name": "extra", "source": str(write_jsonl(tmp_path / "e.jsonl", ROWS)),
                                                   "prompt_field": "problem", "answer_field": "solution", "num_prompts": 4}]},
    })
    train, heldout = load_rows(cfg.data, cfg.eval.num_prompts)
    assert len(heldout) == 20 and {"numbers", "target", "question", "answer"} <= set(train[0])
    sets = load_eval_sets(cfg, heldout)
    assert list(sets) == ["heldout", "extra"] and len(sets["extra"]) == 4
    with pytest.raises(ValueError, match="names must be unique"):
        RunConfig.model_validate({"eval": {"datasets": [EvalSet(name="heldout", source="x").model_dump()]}})


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(_data(tmp_path / "nope.jsonl"))
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown data file type"):
        read_rows(_data(odd))
