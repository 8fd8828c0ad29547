"""The policy update: teacher-forced log-probs, the loss, micro-batches with accumulation.

The normaliser of the loss counts the whole batch, so every micro-batch contributes exactly its
share and the update does not depend on how the batch is split. With num_iterations > 1 the old
log-probs are computed once, before the first pass; reference log-probs (beta > 0) likewise.
Under several processes the normaliser is summed over ranks and divided by the world size (DDP and
FSDP average gradients), so the averaged gradient is the global-batch gradient.
"""

from __future__ import annotations

import contextlib
import math

import torch

from grpo.config import RunConfig
from grpo.distributed import all_reduce_sum, world_size
from grpo.logprobs import token_logprobs
from grpo.loss import objective_from_config
from grpo.moe import RouterControl, replay_from_rollouts
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
    prompt_lens = torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask,
            "sampler_logprobs": sampler_lp, "advantages": advantages, "prompt_lens": prompt_lens}


@torch.no_grad()
def frozen_logprobs(model, batch: dict[str, torch.Tensor], chunks: list[slice], temperature: float,
                    chunk_tokens: int, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs of the whole batch without grad (old policy, or the reference model); [B, S-1].
    `prompt_lens` [B] turns on shared-prompt forwards."""
    return torch.cat([token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c], temperature,
                                     chunk=chunk_tokens, prompt_lens=_rows(prompt_lens, c))[0] for c in chunks])


def _rows(t: torch.Tensor | None, c: slice) -> torch.Tensor | None:
    return t[c] if t is not None else None


def prompt_routing_agrees(rollouts: list[Rollout]) -> bool:
    """Whether every row recorded the same experts for the prompt it shares with other rows (the
    HF engine prefills a prompt once, so its rows always agree; another sampler may not). A
    shared-prompt forward replays one routing per prompt, so it needs this to be exact."""
    first: dict[tuple[int, ...], torch.Tensor] = {}
    for r in rollouts:
        n = len(r.prompt_ids)
        if not torch.equal(first.setdefault(r.prompt_ids, r.routed_experts[:n]), r.routed_experts[:n]):
            return False
    return True


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
                  device: torch.device, ref_model=None, moe: RouterControl | None = None) -> dict[str, float]:
    """One or more optimisation passes over the batch, in micro-batches with accumulation.

    `ref_model` is the frozen reference policy, needed only when `algorithm.beta > 0`.
    Under several processes `rollouts` is this rank's share; the normaliser counts the global
    batch divided by the world size, because DDP/FSDP average gradients over ranks. With `moe`,
    each forward runs inside a routing scope (replay R2/R3, aux loss, expert-load counts). A
    non-finite loss or gradient norm skips the optimizer step (`train/skipped` = 1).
    """
    algo, tr = cfg.algorithm, cfg.trainer
    temperature, chunk_tokens = cfg.rollout.temperature, algo.logprob_chunk
    shared = tr.shared_prompt_forward
    loss_fn, normalizer_of = objective_from_config(algo)
    batch = {k: v.to(device) for k, v in collate(rollouts, pad_id, algo.overlong_filter).items()}
    size = len(rollouts)
    chunks = [slice(i, min(i + tr.micro_batch_size, size)) for i in range(0, size, tr.micro_batch_size)]
    # every normaliser is additive over rows (tokens, sequences, sequences x L_max): sum over ranks,
    # clamp once, divide by the world size (gradients are averaged over ranks)
    local = normalizer_of(batch["mask"], cfg.rollout.max_new_tokens) if bool(batch["mask"].any()) else 0.0
    normalizer = max(all_reduce_sum(local), 1.0) / world_size()
    total_tokens = max(batch["mask"].sum().item(), 1.0)
    moe = moe if moe is not None and moe.is_moe else None
    replay = None  # [B, S, L, k] experts to impose and [B, S] where they are known
    if moe is not None and moe.cfg.routing_replay == "R3":
        replay = replay_from_rollouts(rollouts, batch["input_ids"].shape[1])
        if replay is None:
            raise ValueError("moe.routing_replay=R3 needs the rollout engine to record routing")
        replay = tuple(t.to(device) for t in replay)
        if shared and not prompt_routing_agrees(rollouts):
            shared = False  # the sampler routed a shared prompt differently per row: replay each row's own
    prompt_lens = batch["prompt_lens"] if shared else None  # [B]: shared-prompt forwards

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
                    olds.append(token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c], temperature,
                                               chunk=chunk_tokens, prompt_lens=_rows(prompt_lens, c), routing=sc)[0])
                if sc is not None:
                    recorded.append(sc.used_experts().view(*batch["input_ids"][c].shape, len(moe.routers), -1))
        old = torch.cat(olds)  # [B, S-1]
        if moe is not None and moe.cfg.routing_replay == "R2":  # R2: later passes use these experts
            replay = (torch.cat(recorded), torch.ones_like(batch["attention_mask"], dtype=torch.bool))
    ref = None
    if algo.beta > 0:
        if ref_model is None:
            raise ValueError("algorithm.beta > 0 needs a reference model")
        ref = frozen_logprobs(ref_model, batch, chunks, temperature, chunk_tokens, prompt_lens)

    sums: dict[str, float] = {}
    skipped = 0.0
    for _ in range(algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for c in chunks:
            mask = batch["mask"][c]  # [b, S-1]
            with scope(c) as sc:
                logprobs, entropy = token_logprobs(model, batch["input_ids"][c], batch["attention_mask"][c],
                                                   temperature, with_entropy=True, chunk=chunk_tokens,
                                                   prompt_lens=_rows(prompt_lens, c), routing=sc)  # [b, S-1] x2
            old_lp = old[c] if old is not None else logprobs.detach()  # [b, S-1]
            loss, metrics = loss_fn(logprobs, old_lp, batch["advantages"][c], mask, normalizer=normalizer,
                                    sampler_logprobs=batch["sampler_logprobs"][c],
                                    ref_logprobs=ref[c] if ref is not None else None)
            aux = moe.aux_loss(sc) if sc is not None else None
            if aux is not None:  # weighted by this micro-batch's share of the rank's tokens
                share = batch["attention_mask"][c].sum() / batch["attention_mask"].sum()
                loss = loss + moe.cfg.aux_loss_coef * aux * share
                metrics["train/moe_aux_loss"] = aux.item()
            loss.backward()
            metrics["train/loss"] = loss.item()
            metrics["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
            _merge(sums, metrics, mask.sum().item() / total_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2
        if not (math.isfinite(grad_norm) and math.isfinite(all_reduce_sum(sums.get("train/loss", 0.0)))):
            optimizer.zero_grad(set_to_none=True)  # every rank sees the same all-reduced values
            skipped = 1.0
            break
        optimizer.step()
    sums = {k: v if k.endswith(("_min", "_max")) else v / algo.num_iterations for k, v in sums.items()}
    sums["train/grad_norm"] = grad_norm
    sums["train/overlong_filtered_frac"] = 1.0 - batch["mask"].sum().item() / max(
        sum(r.num_completion_tokens for r in rollouts), 1)
    sums["train/skipped"] = skipped
    return sums
