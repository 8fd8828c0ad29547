"""The worker pool: deadlines, kill-and-replace, memory limit, crashes, errors, cleanup."""

import logging
import os
import time

import pytest

from rewards import RewardError, RewardSpec, Scorer

P = "tests.rewards_plugins:"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_only_the_late_item_and_counts_it():
    with Scorer([RewardSpec(P + "sleepy")], workers=2, timeout_s=0.5, timeout_score=-1.0) as s:
        before = list(s.pool.pids())
        t = time.monotonic()
        r = s.score(["0", "30", "0", "0", "0", "0"], [{}] * 6)
        elapsed = time.monotonic() - t
        assert r.per_function[P + "sleepy"] == [1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
        assert r.metrics[f"reward/{P}sleepy/timeouts"] == 1.0
        assert elapsed < 0.5 + 1.5  # deadline + generous grace for a loaded CI machine (the item sleeps 30 s)
        assert s.pool.replaced == 1
    time.sleep(0.2)
    assert not any(_alive(p) for p in before)


def test_pure_python_busy_loop_is_stopped():
    with Scorer([RewardSpec(P + "spin")], workers=1, timeout_s=0.3) as s:
        r = s.score(["spin", "ok", "spin", "ok"], [{}] * 4)
        assert r.per_function[P + "spin"] == [0.0, 1.0, 0.0, 1.0]
        assert r.metrics[f"reward/{P}spin/timeouts"] == 2.0


def test_single_huge_integer_operation_is_stopped():
    with Scorer([RewardSpec(P + "huge_pow")], workers=1, timeout_s=0.5) as s:
        t = time.monotonic()
        r = s.score(["pow", "ok"], [{}, {}])
        assert time.monotonic() - t < 0.5 + 1.5  # the operation itself runs for minutes
        assert r.per_function[P + "huge_pow"] == [0.0, 1.0]
        assert r.metrics[f"reward/{P}huge_pow/timeouts"] == 1.0


def test_errors_are_logged_counted_and_scored(caplog):
    n = 30
    with Scorer([RewardSpec(P + "raises_on_tenth")], workers=2, error_score=-0.5) as s:
        with caplog.at_level(logging.ERROR, logger="rewards.scorer"):
            r = s.score(["x"] * n, [{"i": i} for i in range(n)], [{"sample_id": f"s{i}"} for i in range(n)])
    assert r.metrics[f"reward/{P}raises_on_tenth/errors"] == 3.0
    assert r.per_function[P + "raises_on_tenth"][10] == -0.5
    assert r.per_function[P + "raises_on_tenth"][11] == 0.5
    assert "s20" in caplog.text and "boom on 20" in caplog.text


def test_fail_fast_names_function_and_sample():
    with Scorer([RewardSpec(P + "raises_on_tenth")], workers=1, fail_fast=True) as s:
        with pytest.raises(RewardError, match=r"raises_on_tenth.*sample s0"):
            s.score(["x"], [{"i": 0}], [{"sample_id": "s0"}])


def test_memory_limit_turns_into_an_error_not_a_dead_parent():
    with Scorer([RewardSpec(P + "hog_memory")], workers=1, memory_mb=400) as s:
        r = s.score(["2000", "1"], [{}, {}])
        assert r.per_function[P + "hog_memory"] == [0.0, 1.0]
        assert r.metrics[f"reward/{P}hog_memory/errors"] == 1.0


def test_crashed_worker_is_replaced():
    with Scorer([RewardSpec(P + "crash")], workers=1) as s:
        r = s.score(["ok", "crash", "ok"], [{}] * 3)
        assert r.per_function[P + "crash"] == [1.0, 0.0, 1.0]
        assert r.metrics[f"reward/{P}crash/errors"] == 1.0


def test_async_rewards_and_none_means_not_applicable():
    specs = [RewardSpec(P + "async_len", 0.1), RewardSpec(P + "not_applicable", 2.0)]
    with Scorer(specs, workers=2) as s:
        r = s.score(["abc", "skip"], [{}, {}])
    assert r.per_function[P + "async_len"] == [3.0, 4.0]
    assert r.per_function[P + "not_applicable"] == [1.0, None]
    assert r.total == pytest.approx([0.3 + 2.0, 0.4])
    assert r.metrics[f"reward/{P}not_applicable"] == 1.0  # mean over applicable samples only


def test_close_leaves_no_process_behind():
    s = Scorer([RewardSpec("format")], workers=2)
    pids = s.pool.pids()
    assert all(_alive(p) for p in pids)
    s.close()
    time.sleep(0.3)
    assert not any(_alive(p) for p in pids)


def test_pool_overhead_is_small_for_a_training_batch():
    comps = ["<think>3+4 is 7</think><answer>7</answer>"] * 64
    with Scorer([RewardSpec("math_answer"), RewardSpec("format", 0.5)], workers=2) as s:
        s.score(comps, [{"answer": "7"}] * 64)  # warm-up
        t = time.perf_counter()
        for _ in range(5):
            r = s.score(comps, [{"answer": "7"}] * 64)
        per_batch = (time.perf_counter() - t) / 5
    assert r.total == [1.5] * 64
    assert per_batch < 0.5, per_batch  # a few ms on an idle 2-core machine; loose bound for CI noise


def test_fail_fast_stops_at_once_and_the_pool_stays_usable():
    specs = [RewardSpec(P + "raises_on_tenth")]
    with Scorer(specs, workers=1, fail_fast=True) as s:
        t = time.monotonic()
        with pytest.raises(RewardError, match="sample s0"):
            # item 0 raises; the nine sleepy-free items after it are not waited for
            s.score(["x"] * 10, [{"i": 0}] + [{"i": 1}] * 9, [{"sample_id": f"s{i}"} for i in range(10)])
        assert time.monotonic() - t < 2.0
        r = s.score(["x"], [{"i": 1}])
        assert r.per_function[P + "raises_on_tenth"] == [0.5]


def test_fail_fast_does_not_stop_on_timeouts():
    with Scorer([RewardSpec(P + "sleepy")], workers=1, timeout_s=0.3, fail_fast=True) as s:
        r = s.score(["5", "0"], [{}, {}])
        assert r.per_function[P + "sleepy"] == [0.0, 1.0]


def test_a_forked_child_exiting_does_not_stop_the_pool():
    with Scorer([RewardSpec("format")], workers=1) as s:
        pid = os.fork()
        if pid == 0:  # e.g. a DataLoader worker: its exit runs finalizers
            s.close()
            os._exit(0)
        os.waitpid(pid, 0)
        r = s.score(["<think>a</think><answer>1</answer>"], [{}])
        assert r.per_function["format"] == [1.0]
