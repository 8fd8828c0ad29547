"""The policy update: teacher-forced log-probs, the loss, micro-batches with accumulation.

The normaliser of the loss counts the whole batch, so every micro-batch contributes exactly its
share and the update does not depend on how the batch is split. With num_iterations > 1 the old
log-probs are computed once, before the first pass; reference log-probs (beta > 0) likewise.
"""

from __future__ import annotations

import torch

from grpo.config import RunConfig
from grpo.logprobs import token_logprobs
from grpo.loss import objective_from_config
from rollout.base import Rollout


def collate(rollouts: list[Rollout], pad_id: int, overlong_filter: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion batch with a mask over completion positions of logprobs.
    With `overlong_filter`, truncated completions (finish_reason "length") get an all-zero mask."""
    seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in rollouts]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, S]
    attention = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(seqs), width - 1))  # [B, S-1]; entry t scores token t+1
    sampler_lp = torch.zeros((len(seqs), width - 1))  # [B, S-1]
    for b, (seq, r) in enumerate(zip(seqs, rollouts)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = 1
        start, end = len(r.prompt_ids) - 1, len(seq) - 1
        mask[b, start:end] = 0.0 if overlong_filter and r.finish_reason == "length" else 1.0
        sampler_lp[b, start:end] = torch.tensor(r.logprobs, dtype=torch.float32)
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask,
            "sampler_logprobs": sampler_lp, "advantages": advantages}


@torch.no_grad()
def frozen_logprobs(model, batch: dict[str, torch.Tensor], chunks: list[slice], temperature: float,
                    chunk_tokens: int) -> torch.Tensor:
    """Log-probs of the whole batch without grad (old policy, or the reference model); [B, S-1]."""
    return torch.cat([token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c], temperature,
                                     chunk=chunk_tokens)[0] for c in chunks])


def _merge(sums: dict[str, float], metrics: dict[str, float], weight: float) -> None:
    """Loss adds up over micro-batches; *_min / *_max keep the extreme; the rest are token-weighted means."""
    for key, value in metrics.items():
        if key == "train/loss":
            sums[key] = sums.get(key, 0.0) + value
        elif key.endswith("_min"):
            sums[key] = min(sums.get(key, value), value)
        elif key.endswith("_max"):
            sums[key] = max(sums.get(key, value), value)
        else:
            sums[key] = sums.get(key, 0.0) + value * weight


def policy_update(model, optimizer, rollouts: list[Rollout], cfg: RunConfig, pad_id: int,
                  device: torch.device, ref_model=None) -> dict[str, float]:
    """One or more optimisation passes over the batch, in micro-batches with accumulation.

    `ref_model` is the frozen reference policy, needed only when `algorithm.beta > 0`.
    """
    algo, tr = cfg.algorithm, cfg.trainer
    temperature, chunk_tokens = cfg.rollout.temperature, algo.logprob_chunk
    loss_fn, normalizer_of = objective_from_config(algo)
    batch = {k: v.to(device) for k, v in collate(rollouts, pad_id, algo.overlong_filter).items()}
    size = len(rollouts)
    chunks = [slice(i, min(i + tr.micro_batch_size, size)) for i in range(0, size, tr.micro_batch_size)]
    normalizer = normalizer_of(batch["mask"], cfg.rollout.max_new_tokens)
    total_tokens = max(batch["mask"].sum().item(), 1.0)

    old = frozen_logprobs(model, batch, chunks, temperature, chunk_tokens) if algo.num_iterations > 1 else None
    ref = None
    if algo.beta > 0:
        if ref_model is None:
            raise ValueError("algorithm.beta > 0 needs a reference model")
        ref = frozen_logprobs(ref_model, batch, chunks, temperature, chunk_tokens)

    sums: dict[str, float] = {}
    for _ in range(algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for c in chunks:
            mask = batch["mask"][c]  # [b, S-1]
            logprobs, entropy = token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c],
                                               temperature, with_entropy=True, chunk=chunk_tokens)  # [b, S-1] x2
            old_lp = old[c] if old is not None else logprobs.detach()  # [b, S-1]
            loss, metrics = loss_fn(logprobs, old_lp, batch["advantages"][c], mask, normalizer=normalizer,
                                    sampler_logprobs=batch["sampler_logprobs"][c],
                                    ref_logprobs=ref[c] if ref is not None else None)
            loss.backward()
            metrics["train/loss"] = loss.item()
            metrics["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
            _merge(sums, metrics, mask.sum().item() / total_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm).item()
        optimizer.step()
    sums = {k: v if k.endswith(("_min", "_max")) else v / algo.num_iterations for k, v in sums.items()}
    sums["train/grad_norm"] = grad_norm
    sums["train/overlong_filtered_frac"] = 1.0 - batch["mask"].sum().item() / max(
        sum(r.num_completion_tokens for r in rollouts), 1)
    return sums
