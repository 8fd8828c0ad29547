"""The clipped policy-gradient objective of GRPO (2402.03300) with DAPO's decoupled clip (2503.14476).

Per completion token t of sequence i, with ratio r_it = exp(logp_it - logp_old_it):

    l_it = -min( r_it * A_i,  clip(r_it, 1 - eps_low, 1 + eps_high) * A_i )

Aggregation (how token losses become one number) decides what a long completion weighs:
- `token_mean`: sum_it l_it / N_tokens, N over the whole global batch (DAPO);
- `seq_mean`:   sum_i (sum_t l_it / |o_i|) / N_seqs (the original GRPO).

The normaliser is passed in (`normalizer`) and counts the *global* batch, so a micro-batch's
loss is its share of the global loss: summing gradients over micro-batches and processes gives
exactly the full-batch gradient, whatever the split.
"""

from __future__ import annotations

import torch


def clipped_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses and ratios, both [B, T]."""
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    return torch.maximum(unclipped, clipped), ratio  # [B, T], [B, T]


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """Reduce [B, T] token losses to this micro-batch's share of the global loss."""
    if mode == "token_mean":
        return (token_losses * mask).sum() / normalizer  # normalizer: tokens in the global batch
    if mode == "seq_mean":
        per_seq = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        return per_seq.sum() / normalizer  # normalizer: sequences in the global batch
    raise ValueError(f"unknown loss aggregation {mode!r}; known: token_mean, seq_mean")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    normalizer: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO loss of one micro-batch.

    logprobs: [B, T] policy log-probs of the completion tokens (requires grad)
    old_logprobs: [B, T] log-probs of the same tokens when the batch was sampled (no grad)
    advantages: [B] one advantage per sequence
    mask: [B, T] 1.0 on completion tokens, 0.0 on padding
    Returns the loss (a scalar, this micro-batch's share of the global loss) and metrics.
    """
    token_losses, ratio = clipped_token_losses(logprobs, old_logprobs.detach(), advantages, clip_low, clip_high)
    loss = aggregate(token_losses, mask, agg, normalizer)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        adv = advantages.unsqueeze(-1).expand_as(ratio)  # [B, T]
        low = ((ratio < 1.0 - clip_low) & (adv < 0)).float()  # clipped from below
        high = ((ratio > 1.0 + clip_high) & (adv > 0)).float()  # clipped from above
        metrics = {
            "train/clip_frac_low": ((low * mask).sum() / n).item(),
            "train/clip_frac_high": ((high * mask).sum() / n).item(),
            "train/ratio_mean": ((ratio * mask).sum() / n).item(),
        }
    return loss, metrics
