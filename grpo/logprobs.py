"""Per-token log-probabilities (and entropy) of completions under the policy, in chunks.

Teacher forcing: one forward pass of the decoder over prompt + completion; the log-probability of
token t comes from the hidden state at position t - 1. Logits are divided by the sampling
temperature, so these are log-probabilities of the distribution the sampler drew from (before
top-k/top-p).

Memory: the full logits tensor is [B, S, V] (2 x 4096 x 151936 float32 is 5 GB, and log_softmax
doubles it). Here the output head is applied to `chunk` positions at a time; log_softmax, the
gather and the entropy are taken per chunk, and each chunk runs under activation checkpointing, so
backward recomputes that chunk's logits instead of keeping them. Peak logits memory is then
proportional to B x chunk x V, in forward and in backward. The values are the same as the plain
full-logits computation (`token_logprobs_plain`, kept as the reference for tests and the bench).

Works for transformers causal LMs whose forward is `lm_head(decoder(...).last_hidden_state)`
(Llama, Qwen2/3, Qwen3-MoE, Mistral, ...), and applies Gemma-2-style final logit soft-capping when
the config asks for it. MoE router logits are not requested here. A wrapped model (DDP, FSDP2,
DeepSpeed) runs its own forward with `output_hidden_states=True` and one position of logits, so
the wrapper's hooks see the pass; the head is then applied in chunks as above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, c, H], targets [B, c] -> logprobs [B, c], entropy [B, c] (entropy without grad)."""
    logits = _upcast(head(hidden))  # [B, c, V]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap  # [B, c, V]
    if temperature != 1.0:
        logits = logits / temperature  # [B, c, V]
    logp_all = F.log_softmax(logits, dim=-1)  # [B, c, V]
    del logits  # log_softmax's backward needs only its output: at most two [B, c, V] tensors live below
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, c]
    with torch.no_grad():  # H = -sum_v p_v log p_v as a batched dot product (no third [B, c, V] tensor)
        entropy = -(logp_all.exp().unsqueeze(-2) @ logp_all.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # [B, c]
    return logprobs, entropy


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: no FSDP2
        return False
    return isinstance(model, FSDPModule)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of input_ids[:, 1:] given the prefix, `chunk` positions of logits at a time.

    input_ids, attention_mask: [B, S] (right-padded: row b is prompt + completion + padding)
    Returns logprobs [B, S-1] (entry t scores token t+1) and, if asked, entropy [B, S-1].
    """
    inner = model.module if hasattr(model, "module") and not hasattr(model, "get_decoder") else model  # DDP, DeepSpeed
    head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    positions = _positions(attention_mask)
    if inner is not model or _is_fsdp(model):
        # through the wrapper's forward (DDP's gradient bookkeeping, FSDP's unsharding), with logits
        # for one position only; the last hidden state (after the final norm) is the decoder's
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=True, logits_to_keep=1)
        last = out.hidden_states[-1]  # [B, S, H]
    else:
        last = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=positions).last_hidden_state  # [B, S, H]
    hidden = last[:, :-1, :]  # [B, S-1, H]
    targets = input_ids[:, 1:]  # [B, S-1]
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropy = [], []
    for start in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, start : start + chunk], targets[:, start : start + chunk]  # [B, c, H], [B, c]
        if use_checkpoint:
            lp, ent = checkpoint(_chunk_logprobs, h, y, head, temperature, softcap, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, y, head, temperature, softcap)
        logprobs.append(lp)  # [B, c]
        entropy.append(ent)  # [B, c]
    return torch.cat(logprobs, dim=1), (torch.cat(entropy, dim=1) if with_entropy else None)  # [B, S-1]


def token_logprobs_plain(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The reference computation: full [B, S, V] logits, then log_softmax and gather; [B, S-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)).logits
    logits = _upcast(logits)  # [B, S, V]
    if temperature != 1.0:
        logits = logits / temperature  # [B, S, V]
    logp_all = F.log_softmax(logits, dim=-1)  # [B, S, V]; on the contiguous tensor, so no extra copy
    return logp_all[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, S-1]
