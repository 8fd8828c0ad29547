"""Per-token log-probabilities (and entropy) of completions under the policy.

Teacher forcing: one forward pass over prompt + completion; the log-probability of token t
comes from the logits at position t - 1. Logits are divided by the sampling temperature, so
these are log-probabilities of the distribution the sampler drew from (before top-k/top-p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of input_ids[:, 1:] given the prefix.

    input_ids, attention_mask: [B, S] (right-padded: row b is prompt + completion + padding)
    Returns logprobs [B, S-1] (entry t scores token t+1) and, if asked, entropy [B, S-1].
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, :-1, :].float() / temperature  # [B, S-1, V]
    logp_all = F.log_softmax(logits, dim=-1)  # [B, S-1, V]
    logprobs = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, S-1]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, S-1]
    return logprobs, entropy
