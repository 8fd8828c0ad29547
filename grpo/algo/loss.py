"""The GRPO objective family as small pure functions of tensors, chosen once from the config.

Per completion token t of sequence i (mask m_it), advantage A_i, policy pi, old policy pi_old
(the trainer's log-probs when the batch was sampled), sampler mu (the rollout engine's log-probs):

    r_it = pi(y_it) / pi_old(y_it)                                    token ratio (GRPO 2402.03300)
    s_i  = exp( sum_t m_it log r_it / |y_i| )                         sequence ratio (GSPO 2507.18071)
    l_it = max( -A_i r, -A_i clip(r, 1 - eps_low, 1 + eps_high) )     r = r_it, or s_i for GSPO;
                                                                      eps_low != eps_high is DAPO's
                                                                      clip-higher (2503.14476)
    dual clip (Ye et al. 1912.09729): if A_i < 0, l_it = min(l_it, -c A_i)
    sampler correction: l_it <- w_it l_it, w from pi_old / mu (TIS, MIS or IcePop, see below)
    KL (beta > 0):      l_it <- l_it + beta * k(pi_ref / pi)   with k in {k1, k2, k3} (Schulman,
                        "Approximating KL divergence", 2020; GRPO uses k3 with beta 0.04)

Aggregation (what a long completion weighs), over the *global* batch of N sequences:

    token_mean: sum_it m_it l_it / sum_it m_it                        (DAPO)
    seq_mean:   (1/N) sum_i sum_t m_it l_it / |y_i|                   (GRPO, GSPO)
    seq_sum:    (1/N) sum_i sum_t m_it l_it / L_max                   (Dr. GRPO 2503.20783,
                                                                      L_max = max completion tokens)

The normaliser (the denominator above) is computed once for the whole global batch and passed in,
so a micro-batch's loss is exactly its share: summing gradients over micro-batches and processes
gives the full-batch gradient whatever the split.

GSPO is implemented in its GSPO-token form (eq. 13 of 2507.18071): every token of sequence i
carries the value s_i with gradient s_i * grad log pi(y_it), which under `seq_mean` is exactly the
gradient of the sequence-level objective.

Sampler/trainer mismatch corrections (weights are constants, no gradient flows through them):

    tis:    w_it = min(pi_old/mu, C)                 truncated IS (Yao et al. 2025, "Your Efficient
                                                     RL Framework Secretly Brings You Off-Policy RL
                                                     Training"), C = correction_high
    mis:    w_it = 1[low <= rho_i <= high], rho_i = exp(mean_t log(pi_old/mu))   sequence-level
                                                     masking with a length-normalised (geometric
                                                     mean) ratio ("When Speed Kills Stability:
                                                     Demystifying RL Collapse from the
                                                     Training-Inference Mismatch", 2025)
    icepop: w_it = (pi_old/mu) * 1[low <= pi_old/mu <= high]          two-sided token mask (IcePop,
                                                     Ring-1T report, 2510.18855)

Asynchronous RL (`trainer.max_staleness` k >= 1): the batch of step s was sampled by the policy
mu = pi_{s-1-j} of an earlier step (0 <= j <= k), not by the weights being updated. The loss is then
the decoupled objective of AReaL (2505.24298, section 5), which separates the behaviour policy that
sampled the data from the proximal policy the update is clipped around:

    J = E_{y ~ mu} [ (pi_prox / mu) * min( r A, clip(r, 1 - eps_low, 1 + eps_high) A ) ],
    r = pi / pi_prox,   pi_prox = pi_old (the trainer's log-probs of the batch before this update)

which is the objective above with the behaviour weight w = pi_old/mu: the sampler correction,
whose mu now also carries the staleness. So an off-policy run always weighs by pi_old/mu: `tis`,
`mis` or `icepop` bound it as above, and `none` (which would treat stale samples as on-policy)
becomes `tis` there (see `objective_from_config`). The ratio statistics `train/mismatch_ratio_*`
are then the off-policy ratios pi_old/mu.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

Tensor = torch.Tensor


# --- surrogates: per-token losses [B, T] and the ratio that was clipped --------------------------


def clip_objective(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, dual_clip: float | None) -> Tensor:
    """-min(r A, clip(r) A), optionally dual-clipped; ratio [B, T], adv [B, 1] -> [B, T]."""
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)  # [B, T]
    return loss


def token_ratio_losses(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                       clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """GRPO/DAPO: one ratio per token. Returns token losses [B, T] and ratios [B, T]."""
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    return clip_objective(ratio, adv, clip_low, clip_high, dual_clip), ratio  # [B, T], [B, T]


def sequence_ratio_losses(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                          clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """GSPO (2507.18071), GSPO-token form: s_i = geometric mean of the token ratios of sequence i.
    Returns token losses [B, T] (all tokens of a sequence share value s_i) and s_i broadcast [B, T]."""
    lengths = mask.sum(-1).clamp(min=1)  # [B]
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1) / lengths  # [B]
    # value s_i, gradient s_i * grad log pi(y_it): sg[s_i] * pi / sg[pi]
    ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach())  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    return clip_objective(ratio, adv, clip_low, clip_high, dual_clip), ratio  # [B, T], [B, T]


# --- KL to the reference policy, per token, with log rho = log pi_ref - log pi --------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = -log rho (unbiased, high variance); [B, T]."""
    return logprobs - ref_logprobs  # [B, T]


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log rho)^2 / 2 (low variance, biased); [B, T]."""
    return 0.5 * (ref_logprobs - logprobs) ** 2  # [B, T]


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = rho - 1 - log rho (unbiased, non-negative; GRPO's estimator); [B, T]."""
    log_rho = ref_logprobs - logprobs  # [B, T]
    return torch.exp(log_rho) - 1.0 - log_rho  # [B, T]


# --- sampler/trainer mismatch corrections: constant weights [B, T] ------------------------------


def no_correction(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    return torch.ones_like(old_logprobs)  # [B, T]


def tis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """Token-level truncated importance weights min(pi_old/mu, high); [B, T]."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=high)  # [B, T]


def mis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """Sequence-level mask on the geometric-mean ratio rho_i in [low, high]; [B, T] of 0/1."""
    lengths = mask.sum(-1).clamp(min=1)  # [B]
    rho = torch.exp(((old_logprobs - sampler_logprobs) * mask).sum(-1) / lengths)  # [B]
    keep = ((rho >= low) & (rho <= high)).to(old_logprobs.dtype)  # [B]
    return keep.unsqueeze(-1).expand_as(old_logprobs)  # [B, T]


def icepop_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """IcePop: the token ratio pi_old/mu where it lies in [low, high], 0 elsewhere; [B, T]."""
    ratio = torch.exp(old_logprobs - sampler_logprobs)  # [B, T]
    return ratio * ((ratio >= low) & (ratio <= high)).to(ratio.dtype)  # [B, T]


# --- aggregation over the global batch ----------------------------------------------------------


def masked_sum(token_losses: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """token_mean (normalizer = global token count) and seq_sum (normalizer = N * L_max)."""
    return (token_losses * mask).sum() / normalizer  # scalar


def seq_mean(token_losses: Tensor, mask: Tensor, normalizer: float) -> Tensor:
    """Mean over each sequence's tokens, summed, over the global sequence count."""
    per_seq = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_seq.sum() / normalizer  # scalar


def count_tokens(mask: Tensor, max_tokens: int) -> float:
    return max(mask.sum().item(), 1.0)


def count_sequences(mask: Tensor, max_tokens: int) -> float:
    return max((mask.sum(-1) > 0).sum().item(), 1.0)


def count_sequences_times_max(mask: Tensor, max_tokens: int) -> float:
    return count_sequences(mask, max_tokens) * max_tokens


# name -> (aggregate(token_losses, mask, normalizer), normalizer(global_mask, max_tokens))
AGGREGATIONS = {
    "token_mean": (masked_sum, count_tokens),
    "seq_mean": (seq_mean, count_sequences),
    "seq_sum": (masked_sum, count_sequences_times_max),
}
SURROGATES = {"token": token_ratio_losses, "sequence": sequence_ratio_losses}
KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
CORRECTIONS = {"none": no_correction, "tis": tis_weights, "mis": mis_weights, "icepop": icepop_weights}


# --- the loss ------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    normalizer: float,
    sampler_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    surrogate: Callable = token_ratio_losses,
    aggregate: Callable = masked_sum,
    kl: Callable | None = None,
    correction: Callable = no_correction,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.0,
    correction_low: float = 0.5,
    correction_high: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """One micro-batch's share of the global loss, and its metrics (see the module docstring).

    logprobs:         [B, T] policy log-probs of the completion tokens (requires grad)
    old_logprobs:     [B, T] trainer log-probs when the batch was sampled (no grad)
    advantages:       [B]    one advantage per sequence
    mask:             [B, T] 1.0 on completion tokens that count, 0.0 on padding / filtered ones
    sampler_logprobs: [B, T] the rollout engine's log-probs (mismatch correction and metrics)
    ref_logprobs:     [B, T] frozen reference policy log-probs (needed when beta > 0)
    normalizer:       denominator of the aggregation over the *global* batch
    """
    old_logprobs = old_logprobs.detach()  # [B, T]
    token_losses, ratio = surrogate(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                    clip_high=clip_high, dual_clip=dual_clip)  # [B, T], [B, T]
    metrics: dict[str, float] = {}
    if sampler_logprobs is not None:
        weights = correction(old_logprobs, sampler_logprobs, mask, correction_low, correction_high)  # [B, T]
        token_losses = token_losses * weights  # [B, T]
        with torch.no_grad():
            on = mask > 0  # [B, T]
            mismatch = torch.exp(old_logprobs - sampler_logprobs)[on]  # [n]
            if mismatch.numel():
                metrics.update({
                    "train/mismatch_ratio_min": mismatch.min().item(),
                    "train/mismatch_ratio_mean": mismatch.mean().item(),
                    "train/mismatch_ratio_max": mismatch.max().item(),
                    "train/mismatch_masked_frac": _masked_mean((weights == 0).to(mask.dtype), mask),
                    "train/mismatch_abs": _masked_mean((old_logprobs - sampler_logprobs).abs(), mask),
                })
    if beta > 0:
        if ref_logprobs is None or kl is None:
            raise ValueError("beta > 0 needs ref_logprobs and a KL estimator")
        kl_tokens = kl(logprobs, ref_logprobs.detach())  # [B, T]
        token_losses = token_losses + beta * kl_tokens  # [B, T]
        metrics["train/kl"] = _masked_mean(kl_tokens.detach(), mask)
    loss = aggregate(token_losses, mask, normalizer)  # scalar
    with torch.no_grad():
        ratio = ratio.detach()  # [B, T]
        adv = advantages.unsqueeze(-1).expand_as(ratio)  # [B, T]
        log_r = old_logprobs - logprobs.detach()  # [B, T]
        metrics.update({
            "train/clip_frac_low": _masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(mask.dtype), mask),
            "train/clip_frac_high": _masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(mask.dtype), mask),
            "train/ratio_mean": _masked_mean(ratio, mask),
            "train/approx_kl_old": _masked_mean(torch.exp(log_r) - 1.0 - log_r, mask),  # k3(pi_old || pi)
        })
        if dual_clip is not None:
            metrics["train/clip_frac_dual"] = _masked_mean(((ratio > dual_clip) & (adv < 0)).to(mask.dtype), mask)
    return loss, metrics


def behaviour_correction(algo, off_policy: bool) -> str:
    """The sampler correction in force: the recipe's, except that off-policy batches (asynchronous
    RL) are always weighted by pi_old/mu, truncated (`tis`) when the recipe asked for `none`."""
    return "tis" if off_policy and algo.sampler_correction == "none" else algo.sampler_correction


def objective_from_config(algo, off_policy: bool = False) -> tuple[Callable, Callable[[Tensor, int], float]]:
    """Resolve an `AlgorithmConfig` once: the loss function (grpo_loss with every choice bound)
    and the function giving the global normaliser from the global mask and max_new_tokens.
    `off_policy`: batches come from earlier policies (the decoupled objective, see the docstring)."""
    aggregate, normalizer = AGGREGATIONS[algo.loss_agg]
    loss_fn = partial(
        grpo_loss, surrogate=SURROGATES[algo.ratio_level], aggregate=aggregate,
        kl=KL_ESTIMATORS[algo.kl_estimator] if algo.beta > 0 else None,
        correction=CORRECTIONS[behaviour_correction(algo, off_policy)], clip_low=algo.clip_low, clip_high=algo.clip_high,
        dual_clip=algo.dual_clip, beta=algo.beta, correction_low=algo.correction_low,
        correction_high=algo.correction_high,
    )
    return loss_fn, normalizer
