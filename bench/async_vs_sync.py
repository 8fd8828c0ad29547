"""Asynchronous RL against the synchronous loop: steps per second with `trainer.max_staleness=1`
over `0`, measured in the same run, alternating, on this machine, for the embedded default
(recipes/tiny-reasoning-cpu.yaml, what `make train` runs) and for recipes/tiny-cpu.yaml.

CPU (what `make bench` runs, with the tiny bases cached):
    python bench/async_vs_sync.py                      # k = 0 and 1, three rounds each, both recipes
    python bench/async_vs_sync.py --staleness 1 2 --rounds 3 --recipe recipes/tiny-cpu.yaml
GPU: not meant for one (asynchronous RL on GPUs runs vLLM in server mode; see README).

Each run is the real CLI (`python -m grpo train RECIPE`, held-out evaluations off). On tiny-cpu the
generation is short (20 tokens) beside the update, so there is less to overlap, and its rounds
vary more from run to run here.
Steps per second count from the end of the first step to the end of the last (metrics.jsonl's
timestamps), so the generation process's start-up and the first step's wait are left out on both
sides. The time each side waited is the per-step mean of `time/update_wait` (the trainer waiting for a
batch) and `time/generation_wait` (the generation process waiting for weights). Target: 1.25 (goal 1.6).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.25


def one_run(staleness: int, steps: int, out: Path, recipe: str = "recipes/tiny-cpu.yaml") -> dict:
    cmd = [sys.executable, "-m", "grpo", "train", recipe, f"trainer.max_staleness={staleness}",
           f"trainer.steps={steps}", "eval.before_and_after=false", "logging.progress=false", "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = rows[1:]
    return {
        "steps_per_s": (len(rows) - 1) / (rows[-1]["time"] - rows[0]["time"]),
        "update_wait_s": statistics.mean(r.get("time/update_wait", 0.0) for r in later),
        "generation_wait_s": statistics.mean(r.get("time/generation_wait", 0.0) for r in later),
        "train_s": statistics.median(r["time/train"] for r in later),
        "generate_s": statistics.median(r["time/generate"] for r in later),
        "reward_last": statistics.mean(r["reward/mean"] for r in rows[-max(1, len(rows) // 10) :]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--staleness", type=int, nargs="+", default=[1], help="values of k compared with 0")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs every k once)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--recipe", nargs="+", default=["recipes/tiny-reasoning-cpu.yaml", "recipes/tiny-cpu.yaml"],
                        help="recipes to time, one JSON line each (default: make train's recipe, then tiny-cpu)")
    args = parser.parse_args()
    for recipe in args.recipe:
        time_recipe(recipe, args)
    return 0


def time_recipe(recipe: str, args) -> None:
    ks = [0, *[k for k in args.staleness if k]]
    runs: dict[int, list[dict]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory(prefix="grpo-bench-async-") as tmp:
        for r in range(args.rounds):
            for k in ks if r % 2 == 0 else reversed(ks):  # alternate the order: load drifts hit both sides
                runs[k].append(one_run(k, args.steps, Path(tmp) / f"k{k}-r{r}", recipe))
                print(f"{recipe} round {r + 1}, max_staleness {k}: {runs[k][-1]['steps_per_s']:.2f} steps/s",
                      file=sys.stderr)
    med = {k: {key: statistics.median(run[key] for run in v) for key in v[0]} for k, v in runs.items()}
    for k in ks[1:]:
        ratio = med[k]["steps_per_s"] / med[0]["steps_per_s"]
        print(json.dumps({
            "bench": "async_vs_sync", "recipe": recipe, "steps": args.steps, "rounds": args.rounds,
            "max_staleness": k, "sync_steps_per_s": round(med[0]["steps_per_s"], 3),
            "async_steps_per_s": round(med[k]["steps_per_s"], 3), "ratio_async_over_sync": round(ratio, 3),
            "sync_steps_per_s_each_round": [round(run["steps_per_s"], 3) for run in runs[0]],
            "async_steps_per_s_each_round": [round(run["steps_per_s"], 3) for run in runs[k]],
            "target": TARGET, "meets_target": ratio >= TARGET,
            "async_trainer_waited_s_per_step": round(med[k]["update_wait_s"], 4),
            "async_generation_waited_s_per_step": round(med[k]["generation_wait_s"], 4),
            "sync_train_s": round(med[0]["train_s"], 4), "async_train_s": round(med[k]["train_s"], 4),
            "sync_generate_s": round(med[0]["generate_s"], 4), "async_generate_s": round(med[k]["generate_s"], 4),
            "sync_reward_last": round(med[0]["reward_last"], 3), "async_reward_last": round(med[k]["reward_last"], 3),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
