"""Hostile completions: code injection, power towers, huge factorials, deep nesting, 1 MB strings,
unicode confusables, NUL and lone surrogates (tests/data/adversarial_rewards.jsonl).

Every item must come back within the deadline plus 0.5 s, nothing outside the sandbox may change
(a marker file that the injection strings try to create must not appear), no worker process may
outlive the pool, and the parent's memory must stay bounded.
"""

import json
import math
import os
import time

from rewards import RewardSpec, Scorer
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "adversarial_rewards.jsonl"
TIMEOUT_S = 2.0
REWARDS = ["math_answer", "format", "format_partial", "countdown"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _build(row: dict, marker: str) -> str:
    if "build" in row:
        b = row["build"]
        return b["prefix"] + b["unit"] * b["times"] + b["middle"] + b["close"] * b["times"] + b["suffix"]
    return row["completion"].replace("{MARKER}", marker)


def load_cases(marker: str):
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, [_build(r, marker) for r in rows]


def test_file_has_enough_hostile_entries():
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    kinds = {r["id"].split("-", 1)[1].split("-")[0] for r in rows}
    assert len(rows) >= 40
    assert {"inject", "power", "factorial", "nest", "1mb", "unicode", "prose"} <= kinds


def test_hostile_inputs_are_contained(tmp_path):
    marker = str(tmp_path / "PWNED")
    rows, completions = load_cases(marker)
    n = len(rows)
    examples = [{"answer": r["gold"], "target": 7, "numbers": [3, 4]} for r in rows]
    contexts = [{"sample_id": r["id"], "prompt": "User: what is 3+4?\nAssistant:"} for r in rows]
    rss_before = _rss_mb()
    t0 = time.monotonic()
    with Scorer([RewardSpec(name) for name in REWARDS], workers=2, timeout_s=TIMEOUT_S, memory_mb=1024) as scorer:
        res = scorer.score(completions, examples, contexts)
        item_seconds = list(scorer.pool.last_item_seconds)
        pids = list(scorer.pool.spawned_pids) + [scorer.pool.pids()[-1]]
    wall = time.monotonic() - t0
    rss_after = _rss_mb()
    time.sleep(0.3)

    # every item came back within the deadline plus 0.5 s, with a finite score
    slowest = max(range(len(item_seconds)), key=item_seconds.__getitem__)
    assert item_seconds[slowest] <= TIMEOUT_S + 0.5, (slowest, item_seconds[slowest])
    for name in REWARDS:
        assert all(v is not None and math.isfinite(v) for v in res.per_function[name]), name
    # nothing outside the sandbox changed
    assert not os.path.exists(marker)
    # no worker (or the zygote) outlives the pool
    assert not [p for p in pids if _alive(p)]
    # the parent holds the inputs, not the work: bounded growth
    assert rss_after - rss_before < 400, (rss_before, rss_after)
    # hostile text never earns reward; the two legitimate controls are scored right
    ids = [r["id"] for r in rows]
    legit, wrong = ids.index(next(i for i in ids if i.endswith("-legit"))), ids.index(next(i for i in ids if i.endswith("-legit-wrong")))
    assert res.per_function["math_answer"][legit] == 1.0
    assert res.per_function["math_answer"][wrong] == 0.0
    assert res.per_function["format"][legit] == 1.0
    # injection strings (gold 424242, a number they never contain) and huge factorials earn nothing
    injected = [i for i, r in enumerate(rows) if "inject" in r["id"] or "factorial" in r["id"]]
    assert all(res.per_function["math_answer"][i] == 0.0 for i in injected)
    print(f"\n{n} hostile completions x {len(REWARDS)} rewards in {wall:.2f} s; slowest item "
          f"{item_seconds[slowest]:.2f} s ({rows[slowest % n]['id']}); timeouts "
          f"{ {k: v for k, v in res.metrics.items() if k.endswith('/timeouts') and v} }; "
          f"parent RSS {rss_before:.0f} -> {rss_after:.0f} MB")
