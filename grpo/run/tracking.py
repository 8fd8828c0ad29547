"""Where metrics and sampled rollouts go: one interface, several sinks.

`metrics.jsonl` in the run directory is always written and is the source of truth; the experiment
trackers (wandb, TensorBoard, MLflow, trackio) are views of it, chosen by `logging.report_to`.
Console progress is the training loop's own tqdm bar, not a sink. Metric keys are namespaced:
`train/`, `reward/`, `rollout/`, `time/`, `moe/`, `eval/`.

Run-directory layout written here:
- `metrics.jsonl`: one JSON object per step, `{"step": int, "time": unix seconds, <key>: float}`.
- `rollouts/step-NNNNNN.jsonl`: every rollout of a logged step, one JSON object each.
- `rollouts.jsonl`: a small sample (the first group of each logged step) for reading with `tail`.
- `wandb/` (offline runs), `tensorboard/` (event files), `mlflow.db` + `mlartifacts/` (MLflow,
  unless MLFLOW_TRACKING_URI points elsewhere) when those trackers are selected.

Trackers wrap accelerate's tracker classes (`accelerate.tracking`), each imported only when chosen.
Each tracker keeps a run id (`Tracker.run_ids()`) that the checkpoint stores; passing it back as
`resume_ids` continues the same tracker run. Rollouts go to trackers as one table per step
(`rollouts/step_NNNNNN`), so earlier steps' tables stay visible.

Call `make_tracker` on the main process only, after the `Accelerator` exists (accelerate's trackers
log through its process state; without one, `make_tracker` creates the default `PartialState`).
A resumed wandb run ignores steps at or below the last step it already has.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

REPORT_TO_CHOICES = ("wandb", "tensorboard", "mlflow", "trackio")

# Columns of the per-step rollout table sent to trackers (`rewards` is flattened to `reward/<fn>`).
ROLLOUT_COLUMNS = ("step", "group", "index", "prompt", "completion", "answer", "reward",
                   "advantage", "finish_reason", "num_tokens")


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_rollouts(self, rows: list[dict], step: int) -> None: ...

    def close(self) -> None: ...


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of `metrics` (trackers reject None, some reject NaN)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


# Rows per step sent to a tracker table; every row is in `rollouts/step-NNNNNN.jsonl` regardless.
TRACKER_TABLE_ROWS = 256


def rollout_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """`(columns, data)` for a tracker table: fixed columns then one `reward/<fn>` per function;
    at most `TRACKER_TABLE_ROWS` rows (the first ones, so whole groups)."""
    rows = rows[:TRACKER_TABLE_ROWS]
    fns = sorted({fn for row in rows for fn in (row.get("rewards") or {})})
    columns = list(ROLLOUT_COLUMNS) + [f"reward/{fn}" for fn in fns]
    data = [[row.get(c) for c in ROLLOUT_COLUMNS] + [(row.get("rewards") or {}).get(fn) for fn in fns]
            for row in rows]
    return columns, data


def _flat_config(config: dict | None, prefix: str = "") -> dict[str, Any]:
    """Nested config -> `{"a.b": scalar}`; lists and other values become strings."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class JsonlSink:
    """Appends metrics and rollouts to files in the run directory (flushed every call)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        if not rows:
            return
        folder = self.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        # Write then rename, so a reader (the dashboard) never sees half a step.
        final = folder / f"step-{step:06d}.jsonl"
        partial = folder / f".step-{step:06d}.jsonl.partial"
        with open(partial, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, final)
        first_group = [r for r in rows if r.get("group") == rows[0].get("group")]
        with open(self.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
            for row in first_group:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._metrics.close()


# ---------------------------------------------------------------------------------------------
# Experiment trackers: thin adapters over accelerate's tracker classes.
# ---------------------------------------------------------------------------------------------


def wandb_mode() -> str:
    """`WANDB_MODE` if set, else "online" with an API key in the environment, else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """wandb run in `run_dir/wandb`; offline unless an API key is set; resumes by run id."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str | None, config: dict | None,
                 resume_id: str | None = None):
        from accelerate.tracking import WandBTracker

        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        self._tracker = WandBTracker(project, name=run_name, dir=str(run_dir), mode=wandb_mode(),
                                     config=config or {}, **resume)
        self._tracker.start()
        self.run_id: str = self._tracker.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log(_scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        if rows:
            columns, data = rollout_table(rows)
            self._tracker.log_table(f"rollouts/step_{step:06d}", columns=columns, data=data, step=step)

    def close(self) -> None:
        self._tracker.finish()


def _markdown_cell(value: Any, limit: int = 2000) -> str:
    text = "" if value is None else str(value)
    if len(text) > limit:
        text = text[:limit] + " …"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


class TensorBoardSink:
    """Event files in `run_dir/tensorboard`; rollouts as a markdown text table per step."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict | None):
        from accelerate.tracking import TensorBoardTracker

        self._tracker = TensorBoardTracker("tensorboard", str(run_dir))
        self._tracker.start()
        # A resumed run appends a new event file to the same folder: the folder is the "run id".
        self.run_id: str = "tensorboard"
        if config:
            self._tracker.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
            self._tracker.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log(_scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        if not rows:
            return
        columns, data = rollout_table(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in data]
        # The text plugin keeps one entry per global step: earlier steps stay browsable.
        self._tracker.writer.add_text("rollouts", "\n".join(lines), global_step=step)
        self._tracker.writer.flush()

    def close(self) -> None:
        self._tracker.finish()


class MlflowSink:
    """MLflow run (`run_dir/mlflow.db` + `run_dir/mlartifacts` unless MLFLOW_TRACKING_URI is set);
    rollouts as one table artifact per step."""

    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, run_name: str | None, config: dict | None,
                 resume_id: str | None = None):
        import mlflow
        from accelerate.tracking import MLflowTracker

        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            artifacts = (run_dir / "mlartifacts").resolve().as_uri()
        self._tracker = MLflowTracker(experiment_name=project, logging_dir=artifacts, run_id=resume_id,
                                      run_name=run_name)
        self._tracker.start()
        self.run_id: str = self._tracker.active_run.info.run_id
        if config and not resume_id:
            self._tracker.store_init_configuration(_flat_config(config))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log(_scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        import mlflow

        if rows:
            columns, data = rollout_table(rows)
            table = {c: [row[i] for row in data] for i, c in enumerate(columns)}
            mlflow.log_table(table, artifact_file=f"rollouts/step-{step:06d}.json")

    def close(self) -> None:
        self._tracker.finish()


class TrackioSink:
    """trackio run (local store, TRACKIO_DIR or the HF cache); the run name is its id."""

    name = "trackio"

    def __init__(self, run_dir: Path, project: str, run_name: str | None, config: dict | None,
                 resume_id: str | None = None):
        from accelerate.tracking import TrackioTracker

        name = resume_id or run_name or f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._tracker = TrackioTracker(project, name=name, config=config or {},
                                       resume="allow" if resume_id else "never", embed=False)
        self._tracker.start()
        self.run_id: str = self._tracker.run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log(_scalars(metrics), step=step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        import trackio

        if rows:
            columns, data = rollout_table(rows)
            self._tracker.log({f"rollouts/step_{step:06d}": trackio.Table(columns=columns, data=data)},
                              step=step)

    def close(self) -> None:
        self._tracker.finish()


# ---------------------------------------------------------------------------------------------


class Tracker:
    """Fans each call out to every sink."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        for sink in self.sinks:
            sink.log_rollouts(rows, step)

    def run_ids(self) -> dict[str, str]:
        """`{tracker name: run id}` to store in a checkpoint and pass back as `resume_ids`."""
        return {s.name: s.run_id for s in self.sinks if getattr(s, "run_id", None)}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_tracker(run_dir: str | Path, report_to: Sequence[str] = (), project: str = "grpo-zero",
                 run_name: str | None = None, config: dict | None = None,
                 resume_ids: dict[str, str] | None = None) -> Tracker:
    """The run's tracker: `metrics.jsonl` + rollout files always, plus each tracker in `report_to`.

    `config` (the resolved recipe as a dict) is stored with each tracker run; `resume_ids` (from
    `Tracker.run_ids()` saved in a checkpoint) continues those tracker runs.
    """
    unknown = [name for name in report_to if name not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(f"logging.report_to: unknown tracker(s) {unknown}; known: {list(REPORT_TO_CHOICES)}")
    run_dir = Path(run_dir)
    resume_ids = resume_ids or {}
    sinks: list[Sink] = [JsonlSink(run_dir)]
    if report_to:
        # accelerate's trackers log through its logger, which needs the (shared) process state;
        # inside the training loop the Accelerator has made it already.
        from accelerate import PartialState

        PartialState()
    for name in dict.fromkeys(report_to):  # de-duplicated, order kept
        if name == "wandb":
            sinks.append(WandbSink(run_dir, project, run_name, config, resume_ids.get("wandb")))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, config))
        elif name == "mlflow":
            sinks.append(MlflowSink(run_dir, project, run_name, config, resume_ids.get("mlflow")))
        elif name == "trackio":
            sinks.append(TrackioSink(run_dir, project, run_name, config, resume_ids.get("trackio")))
    return Tracker(sinks)
