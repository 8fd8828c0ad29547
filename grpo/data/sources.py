"""Where rows come from: built-in tasks, local files, `datasets` directories and Hub data sets.

A data row is a dict with `question` (the problem text) and `answer` (the gold answer, a string),
plus any task fields the rewards need (countdown: `numbers`, `target`). Rows come from

- a built-in synthetic task: `arithmetic`, `sums`, `countdown` (generated from `data.seed`, no download);
- a reasoning-gym task, `reasoning_gym:<task>` (`grpo.data.gym`; generated, scored by its own checker);
- a local file: `.jsonl`, `.json` (a list of objects), `.parquet`, `.csv`;
- a `datasets` directory: what `Dataset.save_to_disk` wrote, or a folder of data files;
- a Hub data set name, read with `datasets.load_dataset(name, config, split=, revision=)`.

`prompt_field`/`answer_field`/`extra_fields` map the source's columns onto row keys. A row with a
missing or mistyped field, a line that is not valid JSON or not UTF-8, or a row over `MAX_ROW_CHARS`
stops loading with an error naming the file and the row number, unless `data.skip_bad_rows` is
set, in which case it is skipped and counted. With `data.max_prompt_tokens`, a prompt too long to
fit in it even at the tokenizer's longest token is dropped before it is tokenised.

    train_rows, heldout = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.config import DataConfig, EvalSet, SourceFields
from grpo.data.gym import gym_split, is_gym_source
from grpo.data.prompts import render_prompts, template_fields
from grpo.data.tasks import SYNTHETIC_TASKS, ArithmeticTask, CountdownTask, SumsTask
from grpo.errors import UserError, first_line

log = logging.getLogger(__name__)

class DataError(UserError):
    """A data problem, phrased for a person: `where: row N: what is wrong`."""


MAX_ROW_CHARS = 1_000_000  # a row (a JSON line, a text field) longer than this is a bad row, never tokenised


@dataclass
class LoadStats:
    """What loading dropped, so a run can report it."""

    rows_read: int = 0
    bad_rows: int = 0
    first_bad: str | None = None
    too_long: int = 0


def _records(src: SourceFields) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(where, iterator of (row number, record)) for a file, a directory or a Hub name."""
    path = Path(src.source).expanduser()
    if path.is_file():
        return str(path), _file_records(path)
    if path.is_dir():
        return str(path), enumerate(_directory_dataset(path, src), start=1)
    if path.suffix.lower() in _READERS or src.source.startswith((".", "/", "~")):
        raise DataError(f"{src.source}: data file not found")
    return _hub_records(src)


def _hub_records(src: SourceFields) -> tuple[str, Iterator[tuple[int, Any]]]:
    """A Hub data set; with the Hub out of reach, its cached copy or, at once, an error saying so."""
    import datasets

    from grpo.hub import hub_reachable

    where = f"{src.source}" + (f" ({src.config})" if src.config else "") + f" [{src.split}]"
    was_offline = datasets.config.HF_HUB_OFFLINE
    unreachable = not was_offline and not hub_reachable()
    datasets.config.HF_HUB_OFFLINE = was_offline or unreachable  # cached copies only, no retries
    try:
        ds = datasets.load_dataset(src.source, src.config, split=src.split, revision=src.revision)
    except (ConnectionError, OSError, ValueError) as exc:
        first = first_line(exc)
        hint = (" The Hub could not be reached (no network?) and there is no cached copy: download it where there is "
                "network, or give a local file" if unreachable else "")
        raise DataError(f"{where}: the data set could not be loaded ({first}).{hint}") from exc
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    return where, enumerate(ds, start=1)


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Line by line, in bytes: a line that is too long, not UTF-8 or not JSON is a bad row named by
    its number; a long line is never decoded whole."""
    with open(path, "rb") as f:
        for number, raw in enumerate(_bounded_lines(f), start=1):
            if raw is None:
                yield number, DataError(f"{path}: row {number}: longer than {MAX_ROW_CHARS:,} bytes")
                continue
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield number, DataError(f"{path}: row {number}: not valid UTF-8 (byte {exc.start} of the line)")
            except json.JSONDecodeError as exc:
                yield number, DataError(f"{path}: row {number}: not valid JSON ({exc.msg})")


def _bounded_lines(f) -> Iterator[bytes | None]:
    """The lines of a binary file; None for a line over MAX_ROW_CHARS bytes (read past in chunks)."""
    while True:
        line = f.readline(MAX_ROW_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_ROW_CHARS and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the long line
                line = f.readline(1 << 20)
            yield None
            continue
        yield line


def _json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or any one list of records
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or an object holding one list of them)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return enumerate(data, start=1)


def _parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc)[:200]})") from None
    return enumerate(table.to_pylist(), start=1)


def _csv(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        number = 0
        try:
            for number, row in enumerate(rows, start=1):  # row 1 is the first line after the header
                yield number, row
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: row {number + 1}: not valid UTF-8 (byte {exc.start} of its block)") from None
        except csv.Error as exc:
            raise DataError(f"{path}: row {number + 1}: {exc}") from None


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}


def _file_records(path: Path) -> Iterator[tuple[int, Any]]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type (expected {', '.join(sorted(_READERS))})")
    return reader(path)


def _directory_dataset(path: Path, src: SourceFields):
    import datasets

    if not any(path.iterdir()):
        raise DataError(f"{path}: empty directory (no data files)")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{path}: no split {src.split!r} (splits: {sorted(ds)})")
            ds = ds[src.split]
        return ds
    return datasets.load_dataset(str(path), src.config, split=src.split)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _check_field(key: str, value: Any) -> tuple[Any, str | None]:
    """(converted value, problem or None) for one row key."""
    if value is None:
        return None, "is empty (null)"
    if isinstance(value, str) and len(value) > MAX_ROW_CHARS:
        return None, f"is {len(value):,} characters long (over {MAX_ROW_CHARS:,})"
    if key == "question":
        if not isinstance(value, str) or not value.strip():
            return None, f"must be non-empty text, got {type(value).__name__} {str(value)[:40]!r}"
        return value, None
    if key == "answer":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None, f"must be text or a number, got {type(value).__name__}"
        text = str(value).strip()
        return (text, None) if text else (None, "is empty")
    if key == "target":
        number = _as_int(value)
        return (number, None) if number is not None else (None, f"must be a whole number, got {value!r}")
    if key == "numbers":
        if isinstance(value, str):  # csv: "[3, 5, 7]" or "3 5 7"
            value = value.strip().strip("[]").replace(",", " ").split()
        if not isinstance(value, (list, tuple)) or not value:
            return None, f"must be a non-empty list of whole numbers, got {type(value).__name__}"
        numbers = [_as_int(v) for v in value]
        if any(n is None for n in numbers):
            return None, f"must be a list of whole numbers, got {list(value)!r}"
        return numbers, None
    return value, None


def _field_map(src: SourceFields) -> dict[str, str]:
    mapping = {}
    if src.prompt_field:
        mapping["question"] = src.prompt_field
    if src.answer_field:
        mapping["answer"] = src.answer_field
    mapping.update(src.extra_fields)
    return mapping


def read_rows(src: SourceFields, skip_bad_rows: bool = False, needed: Iterable[str] = ()) -> tuple[list[dict], LoadStats]:
    """Every row of a file, directory or Hub source, mapped onto row keys and type-checked.

    `needed` lists row keys the prompt template reads; each must be mapped by a field option.
    """
    mapping = _field_map(src)
    missing_map = sorted(set(needed) - set(mapping))
    if missing_map:
        raise DataError(f"{src.source}: the template needs row key(s) {missing_map}; map them with "
                        f"prompt_field or extra_fields")
    where, records = _records(src)
    rows, stats = [], LoadStats()
    for number, record in records:
        stats.rows_read += 1
        problem = None
        if isinstance(record, DataError):
            problem = str(record)
        elif not isinstance(record, dict):
            problem = f"{where}: row {number}: expected an object with fields, got {type(record).__name__}"
        else:
            row = {}
            for key, column in mapping.items():
                if column not in record:
                    problem = f"{where}: row {number}: field {column!r} is missing (fields: {sorted(record)[:12]})"
                    break
                value, why = _check_field(key, record[column])
                if why:
                    problem = f"{where}: row {number}: field {column!r} {why}"
                    break
                row[key] = value
        if problem is None:
            rows.append(row)
            continue
        if not skip_bad_rows:
            raise DataError(problem + " (set data.skip_bad_rows: true to skip such rows)")
        stats.bad_rows += 1
        stats.first_bad = stats.first_bad or problem
    if not rows:
        raise DataError(f"{where}: no usable rows ({stats.rows_read} read, {stats.bad_rows} bad)")
    if stats.bad_rows:
        log.warning("%s: skipped %d bad row(s) of %d; first: %s", where, stats.bad_rows, stats.rows_read, stats.first_bad)
    return rows, stats


def synthetic_task(cfg: DataConfig) -> ArithmeticTask | SumsTask | CountdownTask:
    if cfg.source == "arithmetic":
        return ArithmeticTask(cfg.arithmetic.max_first, cfg.arithmetic.max_second, tuple(cfg.arithmetic.ops))
    if cfg.source == "sums":
        o = cfg.sums
        return SumsTask(o.terms, o.min_first, o.max_first, o.max_term)
    o = cfg.countdown
    return CountdownTask(o.min_numbers, o.max_numbers, o.max_number, o.max_target, tuple(o.ops), o.num_problems)


def filter_long_prompts(rows: list[dict], cfg: DataConfig, tokenizer) -> tuple[list[dict], int]:
    """Rows whose rendered prompt fits in `cfg.max_prompt_tokens`, and how many were dropped."""
    if cfg.max_prompt_tokens is None or tokenizer is None or not rows:  # fast tokenizers reject an empty batch
        return rows, 0
    prompts = render_prompts(cfg, rows, tokenizer)
    # a text longer than max_prompt_tokens tokens of the longest token is too long: never tokenised
    fits = [len(p) <= cfg.max_prompt_tokens * _longest_token(tokenizer) for p in prompts]
    candidates = [p for p, ok in zip(prompts, fits) if ok]
    lengths = iter([len(ids) for ids in tokenizer(candidates, add_special_tokens=False)["input_ids"]] if candidates else [])
    kept = [row for row, ok in zip(rows, fits) if ok and next(lengths) <= cfg.max_prompt_tokens]
    return kept, len(rows) - len(kept)


def _longest_token(tokenizer) -> int:
    """An upper bound on the characters one token decodes to: the longest vocabulary entry (byte-level
    and SentencePiece vocabularies spell each byte or character with one symbol, or more)."""
    cached = getattr(tokenizer, "_grpo_longest_token", None)
    if cached is None:
        cached = max(map(len, tokenizer.get_vocab()), default=1)
        try:
            tokenizer._grpo_longest_token = cached
        except AttributeError:
            pass
    return max(cached, 1)


def load_rows(cfg: DataConfig, num_eval: int, tokenizer=None, stats: LoadStats | None = None) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out evaluation rows); the two never share a problem.

    The held-out rows are the first `num_eval` of a seeded shuffle, taken before any length
    filtering, so they depend on the source and `data.seed` only. With a tokenizer and
    `data.max_prompt_tokens`, prompts longer than that are dropped from both.
    """
    stats = stats if stats is not None else LoadStats()
    if cfg.source in SYNTHETIC_TASKS:
        train, heldout = synthetic_task(cfg).split(num_eval, seed=cfg.seed)
    elif is_gym_source(cfg.source):
        train, heldout = gym_split(cfg, num_eval)
    else:
        rows, read = read_rows(cfg, cfg.skip_bad_rows, template_fields(cfg.template))
        stats.rows_read, stats.bad_rows, stats.first_bad = read.rows_read, read.bad_rows, read.first_bad
        if num_eval >= len(rows):
            raise DataError(f"{cfg.source}: eval.num_prompts={num_eval} leaves no training rows (only {len(rows)})")
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        heldout, train = [rows[i] for i in order[:num_eval]], [rows[i] for i in order[num_eval:]]
    train, dropped_train = filter_long_prompts(train, cfg, tokenizer)
    heldout, dropped_eval = filter_long_prompts(heldout, cfg, tokenizer)
    stats.too_long = dropped_train + dropped_eval
    if stats.too_long:
        log.warning("dropped %d prompt(s) longer than data.max_prompt_tokens=%d", stats.too_long, cfg.max_prompt_tokens)
    if not train:
        raise DataError(f"{cfg.source}: no training rows left after filtering")
    return train, heldout


def load_eval_set(spec: EvalSet, data: DataConfig) -> list[dict]:
    """Rows of one evaluation set (rendered with the training template, so read what it needs)."""
    if spec.source in SYNTHETIC_TASKS or is_gym_source(spec.source):
        raise DataError(f"eval.datasets.{spec.name}: a synthetic task is evaluated through eval.num_prompts")
    rows, _ = read_rows(spec, data.skip_bad_rows, template_fields(data.template))
    return rows[: spec.num_prompts] if spec.num_prompts else rows


def load_eval_sets(cfg, heldout: list[dict]) -> dict[str, list[dict]]:
    """{name: rows}: `heldout` (from the training source) first, then `eval.datasets` in order."""
    sets = {"heldout": heldout} if heldout else {}
    for spec in cfg.eval.datasets:
        sets[spec.name] = load_eval_set(spec, cfg.data)
    return sets
