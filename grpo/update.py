"""The policy update: teacher-forced log-probs, the loss, micro-batches with accumulation.

The normaliser of the loss counts the whole batch, so every micro-batch contributes exactly its
share and the update does not depend on how the batch is split.
"""

from __future__ import annotations

import torch

from grpo.config import RunConfig
from grpo.logprobs import token_logprobs
from grpo.loss import grpo_loss
from rollout.base import Rollout


def collate(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion batch with a mask over completion positions of logprobs."""
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
        mask[b, start:end] = 1.0
        sampler_lp[b, start:end] = torch.tensor(r.logprobs)
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask,
            "sampler_logprobs": sampler_lp, "advantages": advantages}


def policy_update(model, optimizer, rollouts: list[Rollout], cfg: RunConfig, pad_id: int,
                  device: torch.device) -> dict[str, float]:
    """One or more optimisation passes over the batch, in micro-batches with accumulation."""
    algo, tr = cfg.algorithm, cfg.trainer
    temperature = cfg.rollout.temperature
    batch = {k: v.to(device) for k, v in collate(rollouts, pad_id).items()}
    size = len(rollouts)
    chunks = [slice(i, min(i + tr.micro_batch_size, size)) for i in range(0, size, tr.micro_batch_size)]
    normalizer = batch["mask"].sum().item() if algo.loss_agg == "token_mean" else float(size)

    old = None
    if algo.num_iterations > 1:  # old log-probs once, before the first pass
        with torch.no_grad():
            old = torch.cat([token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c], temperature)[0]
                             for c in chunks])

    sums: dict[str, float] = {}
    for _ in range(algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for c in chunks:
            mask = batch["mask"][c]
            logprobs, entropy = token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c],
                                               temperature, with_entropy=True)
            old_lp = old[c] if old is not None else logprobs.detach()
            loss, metrics = grpo_loss(logprobs, old_lp, batch["advantages"][c], mask, clip_low=algo.clip_low,
                                      clip_high=algo.clip_high, agg=algo.loss_agg, normalizer=normalizer)
            loss.backward()
            weight = mask.sum().item() / max(batch["mask"].sum().item(), 1.0)
            metrics["train/loss"] = loss.item()
            metrics["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
            metrics["train/mismatch_abs"] = (((logprobs.detach() - batch["sampler_logprobs"][c]).abs() * mask).sum()
                                             / mask.sum().clamp(min=1)).item()
            for key, value in metrics.items():  # loss adds up over micro-batches; the rest are token-weighted means
                sums[key] = sums.get(key, 0.0) + (value if key == "train/loss" else value * weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm).item()
        optimizer.step()
    sums = {k: v / algo.num_iterations for k, v in sums.items()}
    sums["train/grad_norm"] = grad_norm
    return sums
