"""Environment tokens of multi-turn rollouts are context: the update never depends on their
log-probs (`Rollout.policy_mask`, `grpo.algo.update.collate`).

The rollouts of `test_update_invariance` with a span in the middle of four completions marked as
an environment turn. Changing the sampler log-probs of those tokens (to absurd values) leaves the
updated parameters bit-identical under GRPO with KL, two passes with TIS, and ICEPOP; changing the
log-prob of one policy token, or training on the environment tokens, does change them (so the
comparison can fail).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.grpo.algo import test_update_invariance as inv

pytestmark = pytest.mark.usefixtures("one_thread")

ALGORITHMS = {
    "grpo_kl": {"preset": "grpo", "beta": 0.5},
    "tis_2_passes": {"loss_agg": "token_mean", "num_iterations": 2, "sampler_correction": "tis"},
    "icepop": {"preset": "dr_grpo", "sampler_correction": "icepop"},
}


def with_env_turns(env_logprob: float | None, policy_nudge: float = 0.0, masked: bool = True):
    """The invariance rollouts; in completions of 5+ tokens, tokens 1..2 are an environment turn
    whose log-probs are `env_logprob` (None: as sampled)."""
    out = []
    for r in inv.rollouts():
        n = len(r.completion_ids)
        if n < 5:
            out.append(r)
            continue
        mask = tuple(not (1 <= i <= 2) for i in range(n))
        lps = [lp if env_logprob is None or mask[i] else env_logprob for i, lp in enumerate(r.logprobs)]
        lps[0] += policy_nudge
        out.append(replace(r, logprobs=tuple(lps), policy_mask=mask if masked else None,
                           env_turns=((1, 3, "ok"),), turns=2))
    return out


def updated(rollouts, algorithm):
    original = inv.rollouts
    inv.rollouts = lambda scale="group": rollouts
    try:
        params, _ = inv.updated(micro_batch=3, **algorithm)
    finally:
        inv.rollouts = original
    return params


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_environment_token_logprobs_change_no_gradient(name):
    algorithm = ALGORITHMS[name]
    base = updated(with_env_turns(None), algorithm)
    for absurd in (-80.0, 5.0):
        other = updated(with_env_turns(absurd), algorithm)
        assert all(torch.equal(a, b) for a, b in zip(base, other)), f"{name}: env log-probs {absurd} changed the update"
    nudged = updated(with_env_turns(None, policy_nudge=0.7), algorithm)
    trained_on_env = updated(with_env_turns(None, masked=False), algorithm)
    if algorithm.get("sampler_correction"):  # without a correction the sampler's log-probs enter no gradient
        assert any(not torch.equal(a, b) for a, b in zip(base, nudged)), f"{name}: a policy token's log-prob did nothing"
    assert any(not torch.equal(a, b) for a, b in zip(base, trained_on_env)), f"{name}: the mask did nothing"
