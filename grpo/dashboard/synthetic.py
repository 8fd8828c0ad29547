"""A synthetic run directory, written through the same `JsonlSink` the training loop uses.

For dashboard tests and `bench/dashboard_load.py` until (and besides) a real run of the embedded
default: every metric key the loop logs, MoE expert shares, rollouts with per-function rewards, and
optionally hostile completions (`payloads`) to check that model text is never rendered as HTML.
Rollout rows carry the per-token view (`token_text`, sampler and trainer logprobs, entropy); with
`timeline`, the run also has phase timelines of two trainer ranks and an asynchronous generation
process (rank 1 a straggler now and then) and a watchdog stall event. `write_demo_run` is what
`grpo dashboard --demo` serves: always the same run, made in well under a second.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from grpo.run.tracking import JsonlSink

XSS_PAYLOADS = (
    "<script>window.__xss = 1</script>",
    "<img src=x onerror=\"window.__xss = 2\">",
    "</textarea><script>window.__xss = 3</script>",
    "</script><svg onload=\"window.__xss = 4\">",
)
KNOWN_COMPLETION = "Let me add 3 and 4. Wait, let me check: 3 + 4 = 7. <answer>7</answer>"
_WORDS = ("so", "the", "sum", "is", "then", "we", "carry", "one", "hmm", "wait", "let me check", "add", "digits")


def step_metrics(step: int, steps: int, rng: random.Random, moe_layers: int, experts: int) -> dict:
    """Plausible values for every metric key the training loop logs, at `step` of `steps`."""
    p = step / max(steps, 1)
    acc = min(0.95, 0.05 + 0.9 * p + rng.gauss(0, 0.03))
    m = {
        "train/loss": rng.gauss(0, 0.05), "train/grad_norm": abs(rng.gauss(1.0, 0.3)),
        "train/lr": 1e-6 * min(1.0, step / 10), "train/entropy": 1.5 - p + rng.gauss(0, 0.05),
        "train/kl": 0.01 * p + abs(rng.gauss(0, 0.002)), "train/approx_kl": abs(rng.gauss(0.002, 0.001)),
        "train/clip_frac_low": abs(rng.gauss(0.01, 0.005)), "train/clip_frac_high": abs(rng.gauss(0.02, 0.01)),
        "train/ratio_min": 0.8 + rng.random() * 0.1, "train/ratio_mean": 1.0 + rng.gauss(0, 0.002),
        "train/ratio_max": 1.1 + rng.random() * 0.2, "train/mismatch_abs": abs(rng.gauss(0.01, 0.003)),
        "reward/mean": acc + 0.1, "reward/std": 0.3, "reward/math_answer": acc,
        "reward/format": min(1.0, 0.3 + p), "reward/math_answer/timeouts": float(rng.random() < 0.01),
        "reward/math_answer/errors": 0.0, "rollout/accuracy": acc,
        "rollout/response_length_mean": 40 + 120 * p + rng.gauss(0, 4),
        "rollout/response_length_max": 64 + 200 * p, "rollout/truncated_frac": max(0.0, 0.2 - 0.2 * p),
        "rollout/think_tokens_mean": 30 + 100 * p + rng.gauss(0, 3), "rollout/think_consistent": min(1.0, 0.9 * acc),
        "rollout/tokens_per_s": 900 + rng.gauss(0, 30), "time/generate": 0.16 + rng.gauss(0, 0.01),
        "time/score": 0.01, "time/train": 0.06, "time/weight_sync": 0.005, "time/step": 0.24,
        "rollout/degenerate_groups_frac": min(1.0, max(0.0, 0.6 - 0.4 * p + 0.5 * max(0.0, p - 0.7) + rng.gauss(0, 0.05))),
    }
    for layer in range(moe_layers):
        logits = [math.sin(0.3 * e + layer) * (1 + p) + rng.gauss(0, 0.1) for e in range(experts)]
        total = sum(math.exp(x) for x in logits)
        shares = [math.exp(x) / total for x in logits]
        for e, share in enumerate(shares):
            m[f"moe/layer_{layer}/expert_{e}/share"] = share
        m[f"moe/layer_{layer}/entropy"] = -sum(s * math.log(s) for s in shares)
        m[f"moe/layer_{layer}/max_share"] = max(shares)
        m[f"moe/layer_{layer}/min_share"] = min(shares)
    if step % 10 == 0:
        m["eval/accuracy"] = acc
    if step == 3:
        m["train/grad_norm"] = float("nan")  # written as null: gaps must not break the charts
    return m


def step_rollouts(step: int, groups: int, group_size: int, rng: random.Random, payloads: bool) -> list[dict]:
    rows = []
    for g in range(groups):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = f"What is {a} + {b}? Think, then answer in <answer></answer>."
        rewards_g = []
        for i in range(group_size):
            n_words = rng.randint(5, 60)
            text = " ".join(rng.choice(_WORDS) for _ in range(n_words)) + f" <answer>{a + b if rng.random() < 0.5 else a}</answer>"
            rows.append({"step": step, "group": g, "index": i, "prompt": prompt, "completion": text,
                         "answer": str(a + b), "finish_reason": "stop", "num_tokens": n_words + 4})
            rewards_g.append(float(rng.random() < 0.5) if g % 3 else 1.0)  # every third group all solved
        mean = sum(rewards_g) / len(rewards_g)
        std = (sum((r - mean) ** 2 for r in rewards_g) / len(rewards_g)) ** 0.5
        for j, (row, r) in enumerate(zip(rows[-group_size:], rewards_g)):
            row["rewards"] = {"math_answer": r, "format": 1.0 if j % 3 else None}
            row["reward"] = r
            row["advantage"] = (r - mean) / (std + 1e-4)
    if payloads:
        for row, text in zip(rows, XSS_PAYLOADS):
            row["completion"] = text
        rows[-1]["completion"] = KNOWN_COMPLETION
        # a multi-turn completion (rollout.tools): its turns apart, hostile text in a tool's output too
        rows[-2]["segments"] = [{"kind": "policy", "text": "let me run it "},
                                {"kind": "code", "text": "<code>print(1)</code>"},
                                {"kind": "environment", "status": "error", "text": XSS_PAYLOADS[-1]},
                                {"kind": "policy", "text": rows[-2]["completion"]}]
    for row in rows:
        add_token_view(row, rng)
    return rows


def add_token_view(row: dict, rng: random.Random) -> None:
    """Per-token fields as `grpo.run.step.rollout_rows` writes them (word pieces stand in for tokens),
    plus the trainer's logprobs and entropy."""
    pieces = re.findall(r"\s*\S+", row["completion"]) or [row["completion"]]
    lps = [round(min(0.0, -abs(rng.gauss(0.3, 0.6))), 4) for _ in pieces]
    row.update({"num_tokens": len(pieces), "prompt_tokens": len(row["prompt"].split()), "token_text": pieces,
                "token_logprobs": lps, "token_trainer_logprobs": [round(lp + rng.gauss(0, 0.05), 4) for lp in lps],
                "token_entropy": [round(abs(rng.gauss(0.8, 0.5)), 4) for _ in pieces]})


def write_timeline(run_dir: Path, steps: int, rng: random.Random, t0: float = 1_700_000_000.0) -> None:
    """Phase spans of an asynchronous run: two trainer ranks (rank 1 straggles now and then) and the
    generation process, which samples step s + 1 while the trainers learn from step s."""
    folder = run_dir / "timeline"
    folder.mkdir(parents=True, exist_ok=True)
    files = {who: open(folder / f"{who}.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
             for who in ("trainer-rank0", "trainer-rank1", "generation-rank0")}

    def span(who: str, step: int, phase: str, start: float, end: float) -> None:
        role, rank = who.split("-rank")
        files[who].write(json.dumps({"role": role, "rank": int(rank), "step": step, "phase": phase,
                                     "start": round(start, 4), "end": round(end, 4)}) + "\n")

    try:
        gen_free, t = t0, t0  # when the generation process can start its next step; the trainers' clock
        ready = {}
        for step in range(1, steps + 1):
            w0 = gen_free
            start = max(gen_free, t - 0.5) if step > 1 else t0  # staleness 1: waits for the weights of step - 2
            if start > w0 + 0.001:
                span("generation-rank0", step, "wait for weights", w0, start)
            g = rng.uniform(1.2, 1.8)
            span("generation-rank0", step, "generate", start, start + g)
            span("generation-rank0", step, "score", start + g, start + g + 0.2)
            ready[step] = gen_free = start + g + 0.2
            ends = []
            for rank in (0, 1):
                who = f"trainer-rank{rank}"
                a = t
                if ready[step] > a:
                    span(who, step, "wait for batch", a, ready[step])
                    a = ready[step]
                learn = rng.uniform(0.9, 1.1) * (2.5 if rank == 1 and step % 7 == 3 else 1.0)
                span(who, step, "learn", a, a + learn)
                ends.append(a + learn)
            sync = max(ends)
            for rank in (0, 1):
                who = f"trainer-rank{rank}"
                if sync > ends[rank] + 0.001:
                    span(who, step, "collective", ends[rank], sync)  # waiting for the straggler
                span(who, step, "push weights", sync, sync + 0.15)
                if step % 10 == 0:
                    span(who, step, "checkpoint", sync + 0.15, sync + 0.6)
            t = sync + (0.6 if step % 10 == 0 else 0.15)
    finally:
        for f in files.values():
            f.close()


def write_stall_event(run_dir: Path, step: int, kind: str = "stall", role: str = "trainer", rank: int = 1,
                      phase: str = "learn", seconds: float = 1800.0, time: float = 1_700_000_000.0) -> None:
    """One watchdog event, as `grpo.run.watchdog.Watchdog` appends it to `watchdog/events.jsonl`."""
    folder = run_dir / "watchdog"
    folder.mkdir(parents=True, exist_ok=True)
    event = {"time": time, "kind": kind, "role": role, "rank": rank, "step": step, "phase": phase,
             "seconds": seconds, "stacks": f"stacks-{role}-rank{rank}-step{step}.txt"}
    with open(folder / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def write_synthetic_run(run_dir: str | Path, steps: int = 40, rollout_every: int = 5, groups: int = 2,
                        group_size: int = 4, moe_layers: int = 2, experts: int = 8,
                        payloads: bool = False, seed: int = 0, timeline: bool = False) -> Path:
    """Write `steps` steps of metrics and, every `rollout_every` steps, `groups * group_size` rollouts.

    With `payloads`, each logged step's first completions are the `XSS_PAYLOADS` and its last one is
    `KNOWN_COMPLETION`.
    """
    rng = random.Random(seed)
    sink = JsonlSink(run_dir)
    try:
        for step in range(1, steps + 1):
            sink.log(step_metrics(step, steps, rng, moe_layers, experts), step)
            if step % rollout_every == 0 or step == steps:
                sink.log_rollouts(step_rollouts(step, groups, group_size, rng, payloads), step)
    finally:
        sink.close()
    if timeline:
        write_timeline(Path(run_dir), steps, rng)
        write_stall_event(Path(run_dir), step=min(steps, 24))
    return Path(run_dir)


DEMO_RUN = "demo-async-run"


def write_demo_run(runs_dir: str | Path) -> Path:
    """The run `grpo dashboard --demo` shows: 60 steps of an asynchronous two-rank run, with every
    panel filled (curves, MoE, rollouts with per-token data, timeline, a stall marker)."""
    return write_synthetic_run(Path(runs_dir) / DEMO_RUN, steps=60, rollout_every=5, groups=6, group_size=4,
                               moe_layers=2, experts=8, seed=30, timeline=True)
