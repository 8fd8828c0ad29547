"""Hand-computed checks of every loss variant (grpo/algo/loss.py). Each expected value has its arithmetic
written next to it; log-probs are chosen so that ratios are round numbers (old log-prob 0)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algo.loss import (
    count_sequences,
    count_sequences_times_max,
    count_tokens,
    grpo_loss,
    icepop_weights,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_sum,
    mis_weights,
    objective_from_config,
    seq_mean,
    sequence_ratio_losses,
    tis_weights,
    token_ratio_losses,
)
from grpo.config import AlgorithmConfig

D = torch.float64


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-9)


def logs(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D).log()


# Two sequences, two token slots; sequence 1 has one real token (its second slot is padding).
#   seq 0: A = +1, ratios [1.5, 0.9]
#   seq 1: A = -1, ratios [0.5, (1.1, padding)]
RATIOS = [[1.5, 0.9], [0.5, 1.1]]
ADV = torch.tensor([1.0, -1.0], dtype=D)
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
# token losses with clip_low 0.2, clip_high 0.28: l = max(-A r, -A clip(r, 0.8, 1.28))
#   seq 0 tok 0: max(-1.5, -1.28) = -1.28   (clipped above: no gradient)
#   seq 0 tok 1: max(-0.9, -0.9)  = -0.9
#   seq 1 tok 0: max(0.5, 0.8)    =  0.8    (clipped below: no gradient)
CLIP = dict(clip_low=0.2, clip_high=0.28)


def token_loss(agg, normalizer):
    logprobs = logs(RATIOS).requires_grad_()
    old = torch.zeros(2, 2, dtype=D)
    loss, metrics = grpo_loss(logprobs, old, ADV, MASK, normalizer=normalizer, aggregate=agg, **CLIP)
    loss.backward()
    return loss.item(), logprobs.grad, metrics


def test_token_mean_clip_higher():
    loss, grad, metrics = token_loss(masked_sum, count_tokens(MASK, 4))
    assert loss == pytest.approx((-1.28 - 0.9 + 0.8) / 3)  # 3 real tokens: -1.38 / 3 = -0.46
    # d/dlogp of -A r / 3 = -A r / 3 where unclipped: seq 0 tok 1: -0.9 / 3 = -0.3; clipped tokens 0
    close(grad, [[0.0, -0.3], [0.0, 0.0]])
    assert metrics["train/clip_frac_high"] == pytest.approx(1 / 3)  # seq 0 tok 0 (r 1.5 > 1.28, A > 0)
    assert metrics["train/clip_frac_low"] == pytest.approx(1 / 3)  # seq 1 tok 0 (r 0.5 < 0.8, A < 0)
    assert metrics["train/ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3)  # 2.9 / 3


def test_seq_mean_grpo():
    loss, grad, _ = token_loss(seq_mean, count_sequences(MASK, 4))
    # seq 0 mean (-1.28 - 0.9) / 2 = -1.09; seq 1 mean 0.8 / 1 = 0.8; (-1.09 + 0.8) / 2 = -0.145
    assert loss == pytest.approx(-0.145)
    # seq 0 tok 1: -0.9 / (2 tokens * 2 sequences) = -0.225
    close(grad, [[0.0, -0.225], [0.0, 0.0]])


def test_seq_sum_dr_grpo():
    loss, grad, _ = token_loss(masked_sum, count_sequences_times_max(MASK, 4))
    # (-1.28 - 0.9 + 0.8) / (2 sequences * L_max 4) = -1.38 / 8 = -0.1725
    assert loss == pytest.approx(-0.1725)
    close(grad, [[0.0, -0.9 / 8], [0.0, 0.0]])  # -0.1125


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, r = 5: max(-A r, -A clip(r)) = max(5, 1.2) = 5; dual clip c = 3: min(5, 3 * 1) = 3
    # A = +1, r = 5: dual clip does not apply: max(-5, -1.2) = -1.2
    logprobs = logs([[5.0], [5.0]]).requires_grad_()
    old = torch.zeros(2, 1, dtype=D)
    losses, ratio = token_ratio_losses(logprobs, old, torch.tensor([-1.0, 1.0], dtype=D), torch.ones(2, 1, dtype=D),
                                       clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    assert losses.squeeze(-1).tolist() == pytest.approx([3.0, -1.2])
    losses.sum().backward()
    assert logprobs.grad.tolist() == [[0.0], [0.0]]  # both capped: constant
    without, _ = token_ratio_losses(logprobs, old, torch.tensor([-1.0, 1.0], dtype=D), torch.ones(2, 1, dtype=D),
                                    clip_low=0.2, clip_high=0.2, dual_clip=None)
    assert without.squeeze(-1).tolist() == pytest.approx([5.0, -1.2])


def test_gspo_sequence_ratio():
    # both sequences: token ratios [1.2, 0.8] -> s = exp((log 1.2 + log 0.8) / 2) = sqrt(0.96) = 0.979796
    # clip range [1 - 3e-4, 1 + 4e-4] = [0.9997, 1.0004]
    #   A = +1: max(-0.979796, -0.9997) = -0.979796 (unclipped; gradient -A s / |y| = -0.489898 per token)
    #   A = -1: max(0.979796, 0.9997) = 0.9997 (clipped: no gradient)
    s = math.sqrt(0.96)
    logprobs = logs([[1.2, 0.8], [1.2, 0.8]]).requires_grad_()
    old = torch.zeros(2, 2, dtype=D)
    mask = torch.ones(2, 2, dtype=D)
    loss, metrics = grpo_loss(logprobs, old, ADV, mask, normalizer=2.0, surrogate=sequence_ratio_losses,
                              aggregate=seq_mean, clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx((-s + 0.9997) / 2)  # (-0.979796 + 0.9997) / 2 = 0.009952
    loss.backward()
    # per token of seq 0: -A * s / |y| / N = -0.979796 / 2 / 2 = -0.244949
    close(logprobs.grad, [[-s / 4, -s / 4], [0.0, 0.0]])
    assert metrics["train/clip_frac_low"] == pytest.approx(0.5)  # the 2 tokens of seq 1 out of 4
    # padding does not enter s: seq [1.2, 0.8, pad 7.0] has the same s
    lp = logs([[1.2, 0.8, 7.0]])
    _, ratio = sequence_ratio_losses(lp, torch.zeros(1, 3, dtype=D), torch.ones(1, dtype=D),
                                     torch.tensor([[1.0, 1.0, 0.0]], dtype=D), clip_low=0.2, clip_high=0.2, dual_clip=None)
    assert ratio[0, 0].item() == pytest.approx(s)


def test_kl_estimators():
    # pi = 0.5, pi_ref = 0.25: log rho = log(0.25 / 0.5) = -0.693147
    lp, ref = logs([[0.5]]), logs([[0.25]])
    assert kl_k1(lp, ref).item() == pytest.approx(0.693147, abs=1e-6)  # -log rho
    assert kl_k2(lp, ref).item() == pytest.approx(0.240227, abs=1e-6)  # 0.5 * 0.693147^2
    assert kl_k3(lp, ref).item() == pytest.approx(0.193147, abs=1e-6)  # 0.5 - 1 + 0.693147


def test_kl_term_in_loss():
    # A = 0 so only the KL term: beta * k3 = 0.1 * 0.193147 = 0.0193147; d k3 / d logp = 1 - rho = 1 - 0.5
    lp = logs([[0.5]]).requires_grad_()
    loss, metrics = grpo_loss(lp, lp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 1, dtype=D), normalizer=1.0,
                              ref_logprobs=logs([[0.25]]), kl=kl_k3, beta=0.1)
    assert loss.item() == pytest.approx(0.0193147, abs=1e-7)
    assert metrics["train/kl"] == pytest.approx(0.193147, abs=1e-6)
    loss.backward()
    assert lp.grad.item() == pytest.approx(0.1 * 0.5)  # beta * (1 - rho) = 0.05
    with pytest.raises(ValueError):
        grpo_loss(lp, lp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 1, dtype=D), normalizer=1.0, beta=0.1)


# Sampler mismatch: old log-probs 0, sampler log-probs -log w, so pi_old / mu = w.
#   seq 0: w = [3.0, 0.4, 1.5]; seq 1: w = [4.0, 4.0, (padding)]
W = [[3.0, 0.4, 1.5], [4.0, 4.0, 1.0]]
WMASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)


def corrected(correction):
    old = torch.zeros(2, 3, dtype=D)
    lp = old.clone().requires_grad_()  # on policy: r = 1, token loss -A = -1 (A = 1)
    return grpo_loss(lp, old, torch.ones(2, dtype=D), WMASK, normalizer=5.0, sampler_logprobs=-logs(W),
                     correction=correction, correction_low=0.5, correction_high=2.0)


def test_tis_truncates_weights():
    weights = tis_weights(torch.zeros(2, 3, dtype=D), -logs(W), WMASK, 0.5, 2.0)
    close(weights, [[2.0, 0.4, 1.5], [2.0, 2.0, 1.0]])  # min(w, 2)
    loss, metrics = corrected(tis_weights)
    assert loss.item() == pytest.approx(-(2.0 + 0.4 + 1.5 + 2.0 + 2.0) / 5)  # -7.9 / 5 = -1.58
    assert metrics["train/mismatch_ratio_min"] == pytest.approx(0.4)
    assert metrics["train/mismatch_ratio_max"] == pytest.approx(4.0)
    assert metrics["train/mismatch_ratio_mean"] == pytest.approx(12.9 / 5)  # (3 + .4 + 1.5 + 4 + 4) / 5 = 2.58
    # mean |log w| = (1.098612 + 0.916291 + 0.405465 + 2 * 1.386294) / 5 = 1.038591
    assert metrics["train/mismatch_abs"] == pytest.approx(1.038591, abs=1e-6)
    assert metrics["train/mismatch_masked_frac"] == 0.0


def test_mis_masks_sequences_by_geometric_mean():
    # seq 0: rho = (3 * 0.4 * 1.5)^(1/3) = 1.8^(1/3) = 1.2164 in [0.5, 2] -> kept
    # seq 1: rho = (4 * 4)^(1/2) = 4 (padding ignored) > 2 -> masked
    weights = mis_weights(torch.zeros(2, 3, dtype=D), -logs(W), WMASK, 0.5, 2.0)
    assert weights.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    loss, metrics = corrected(mis_weights)
    assert loss.item() == pytest.approx(-3 / 5)  # three tokens of -1 kept over 5 tokens
    assert metrics["train/mismatch_masked_frac"] == pytest.approx(2 / 5)


def test_icepop_two_sided_token_mask():
    # w in [0.5, 2] keeps its weight w, elsewhere 0: [0, 0, 1.5], [0, 0]
    weights = icepop_weights(torch.zeros(2, 3, dtype=D), -logs(W), WMASK, 0.5, 2.0)
    close(weights, [[0.0, 0.0, 1.5], [0.0, 0.0, 1.0]])
    loss, metrics = corrected(icepop_weights)
    assert loss.item() == pytest.approx(-1.5 / 5)  # -0.3
    assert metrics["train/mismatch_masked_frac"] == pytest.approx(4 / 5)


def test_correction_weights_carry_no_gradient():
    # TIS weight 2 on a token with A = 1, r = 1: loss -2 * r / 1, d/dlogp = -2 * r = -2 (weight is a constant)
    old = torch.zeros(1, 1, dtype=D)
    lp = old.clone().requires_grad_()
    sampler = -logs([[3.0]])
    loss, _ = grpo_loss(lp, old, torch.ones(1, dtype=D), torch.ones(1, 1, dtype=D), normalizer=1.0,
                        sampler_logprobs=sampler, correction=tis_weights, correction_high=2.0)
    loss.backward()
    assert lp.grad.item() == pytest.approx(-2.0)


def test_approx_kl_between_old_and_new():
    # log(pi_old / pi) = -log 1.5 = -0.405465: k3 = exp(-0.405465) - 1 + 0.405465 = 0.666667 - 1 + 0.405465 = 0.072132
    _, metrics = grpo_loss(logs([[1.5]]), torch.zeros(1, 1, dtype=D), torch.ones(1, dtype=D),
                           torch.ones(1, 1, dtype=D), normalizer=1.0)
    assert metrics["train/approx_kl_old"] == pytest.approx(0.072132, abs=1e-6)


def test_objective_from_config_binds_each_choice():
    loss_fn, normalizer = objective_from_config(AlgorithmConfig(preset="gspo"))
    assert loss_fn.keywords["surrogate"] is sequence_ratio_losses
    assert loss_fn.keywords["aggregate"] is seq_mean and normalizer is count_sequences
    assert loss_fn.keywords["kl"] is None  # beta 0
    loss_fn, normalizer = objective_from_config(AlgorithmConfig(preset="dr_grpo"))
    assert normalizer is count_sequences_times_max
    loss_fn, _ = objective_from_config(AlgorithmConfig(preset="grpo"))
    assert loss_fn.keywords["kl"] is kl_k3 and loss_fn.keywords["beta"] == 0.04
    loss_fn, _ = objective_from_config(AlgorithmConfig(sampler_correction="icepop"))
    assert loss_fn.keywords["correction"] is icepop_weights
