"""Planted stalls for the watchdog's tests, in every Python process started with this folder on
PYTHONPATH (accelerate's workers too). GRPO_TEST_STALL="PHASE:CALL[:RANK]": the CALL-th call of
the phase's function (1-based) in the process of that rank (any rank when left out) never returns,
after touching the file GRPO_TEST_STALL_MARK. PHASE: generate (the transformers engine) or learn
(the policy update)."""

import os

_spec = os.environ.get("GRPO_TEST_STALL")
if _spec:
    import threading
    import time

    _phase, _call, *_rank = _spec.split(":")
    _calls = {"n": 0}

    def _planted(real):
        def wrapper(*args, **kwargs):
            rank = os.environ.get("RANK", "0")
            if not _rank or _rank[0] == rank:
                _calls["n"] += 1
                if _calls["n"] == int(_call):
                    with open(os.environ["GRPO_TEST_STALL_MARK"], "w") as f:
                        f.write(f"{time.time()} {rank}")
                    threading.Event().wait()  # the planted hang
            return real(*args, **kwargs)

        return wrapper

    if _phase == "generate":
        from rollout.hf.engine import HFEngine

        HFEngine.generate = _planted(HFEngine.generate)
    elif _phase == "learn":
        import grpo.algo.update

        grpo.algo.update.policy_update = _planted(grpo.algo.update.policy_update)
