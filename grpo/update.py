"""The policy update: teacher-forced log-probs, the loss, micro-batches with accumulation.

The normaliser of the loss counts the whole batch, so every micro-batch contributes exactly its
share and the update does not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import math

import torch

from grpo.config import RunConfig
from grpo.distributed import all_reduce_sum, world_size
from grpo.logprobs import token_logprobs
from grpo.loss import grpo_loss
from grpo.moe import RouterControl, replay_from_rollouts
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
                  device: torch.device, moe: RouterControl | None = None) -> dict[str, float]:
    """One or more optimisation passes over the batch, in micro-batches with accumulation.

    Under several processes `rollouts` is this rank's share; the normaliser counts the global
    batch divided by the world size, because DDP/FSDP average gradients over ranks. With `moe`,
    each forward runs inside a routing scope (replay R2/R3, aux loss, expert-load counts). A
    non-finite loss or gradient norm skips the optimizer step (`train/skipped` = 1).
    """
    algo, tr = cfg.algorithm, cfg.trainer
    temperature = cfg.rollout.temperature
    batch = {k: v.to(device) for k, v in collate(rollouts, pad_id).items()}
    size = len(rollouts)
    chunks = [slice(i, min(i + tr.micro_batch_size, size)) for i in range(0, size, tr.micro_batch_size)]
    local = batch["mask"].sum().item() if algo.loss_agg == "token_mean" else float(size)
    normalizer = all_reduce_sum(local) / world_size()
    moe = moe if moe is not None and moe.is_moe else None
    replay = None  # [B, S, L, k] experts to impose and [B, S] where they are known
    if moe is not None and moe.cfg.routing_replay == "R3":
        replay = replay_from_rollouts(rollouts, batch["input_ids"].shape[1])
        if replay is None:
            raise ValueError("moe.routing_replay=R3 needs the rollout engine to record routing")
        replay = tuple(t.to(device) for t in replay)

    def scope(c, **kw):  # routing scope of one micro-batch forward (a no-op for dense models)
        if moe is None:
            return contextlib.nullcontext(None)
        rep = (replay[0][c], replay[1][c]) if replay is not None else (None, None)
        return moe.scope(batch["attention_mask"][c], *rep, keep_logits=moe.cfg.aux_loss_coef > 0, **kw)

    old = None
    if algo.num_iterations > 1:  # old log-probs once, before the first pass
        olds, recorded = [], []
        with torch.no_grad():
            for c in chunks:
                with scope(c, count=False) as sc:
                    olds.append(token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c], temperature)[0])
                if sc is not None:
                    recorded.append(sc.used_experts().view(*batch["input_ids"][c].shape, len(moe.routers), -1))
        old = torch.cat(olds)
        if moe is not None and moe.cfg.routing_replay == "R2":  # R2: later passes use these experts
            replay = (torch.cat(recorded), torch.ones_like(batch["attention_mask"], dtype=torch.bool))

    sums: dict[str, float] = {}
    skipped = 0.0
    for _ in range(algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for c in chunks:
            mask = batch["mask"][c]
            with scope(c) as sc:
                logprobs, entropy = token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c],
                                                   temperature, with_entropy=True)
            old_lp = old[c] if old is not None else logprobs.detach()
            loss, metrics = grpo_loss(logprobs, old_lp, batch["advantages"][c], mask, clip_low=algo.clip_low,
                                      clip_high=algo.clip_high, agg=algo.loss_agg, normalizer=normalizer)
            aux = moe.aux_loss(sc) if sc is not None else None
            if aux is not None:  # weighted by this micro-batch's share of the rank's tokens
                share = batch["attention_mask"][c].sum() / batch["attention_mask"].sum()
                loss = loss + moe.cfg.aux_loss_coef * aux * share
                metrics["train/moe_aux_loss"] = aux.item()
            loss.backward()
            weight = mask.sum().item() / max(batch["mask"].sum().item(), 1.0)
            metrics["train/loss"] = loss.item()
            metrics["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
            metrics["train/mismatch_abs"] = (((logprobs.detach() - batch["sampler_logprobs"][c]).abs() * mask).sum()
                                             / mask.sum().clamp(min=1)).item()
            for key, value in metrics.items():  # loss adds up over micro-batches; the rest are token-weighted means
                sums[key] = sums.get(key, 0.0) + (value if key == "train/loss" else value * weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2
        if not (math.isfinite(grad_norm) and math.isfinite(all_reduce_sum(sums.get("train/loss", 0.0)))):
            optimizer.zero_grad(set_to_none=True)  # every rank sees the same all-reduced values
            skipped = 1.0
            break
        optimizer.step()
    sums = {k: v / algo.num_iterations for k, v in sums.items()}
    sums["train/grad_norm"] = grad_norm
    sums["train/skipped"] = skipped
    return sums
