"""The policy update: teacher-forced log-probs, the loss, mini-batches and micro-batches with accumulation.

A generation batch is trained with `algorithm.num_iterations` passes; each pass cuts the batch's
groups into `algorithm.mini_batches` mini-batches of whole groups, or deals each group's outputs
over them when a process holds fewer groups (`mini_batch_rows`; advantages were computed over
the whole batch before), one optimizer step each (DeepSeek-R1's 8,192 outputs in 16 mini-batches;
veRL's `ppo_mini_batch_size`). With more than one optimizer step per batch the old log-probs are
computed once, before the first, so the ratio of every later step is taken against the policy
that the batch was trained from; the sampler's log-probs stay the behaviour policy of the
mismatch correction for every mini-batch. Reference log-probs (beta > 0) are computed once too.

The normaliser of the loss counts the whole mini-batch, so every micro-batch contributes exactly
its share and the update does not depend on how a mini-batch is split. Under several processes
the normaliser is summed over ranks and divided by the world size (DDP and FSDP average
gradients), so the averaged gradient is the global mini-batch's gradient.

Micro-batches are consecutive rows cut by `trainer.micro_batch_size` sequences and
`trainer.max_tokens_per_micro_batch` tokens; by default each runs padding-free, its sequences
packed into one row (grpo/algo/packing.py), with the same values as the right-padded forward.
Processes that run collectives per forward (DDP, FSDP) cut theirs into the same number.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass

import torch

from grpo.algo.logprobs import token_logprobs
from grpo.algo.loss import objective_from_config
from grpo.algo.moe import RouterControl, replay_from_rollouts
from grpo.algo.packing import micro_batches, packed_logprobs, packing_supported, split_to, worth_packing
from grpo.collectives import all_reduce_sum, all_reduce_tensor, world_size
from grpo.config import AlgorithmConfig, RunConfig, TrainerConfig
from grpo.phases import beat
from rollout.base import Rollout


def collate(rollouts: list[Rollout], pad_id: int, overlong_filter: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion batch with a mask over completion positions of logprobs.
    With `overlong_filter`, truncated completions (finish_reason "length") get an all-zero mask.
    Multi-turn rollouts: environment tokens (`Rollout.policy_mask` False) are context: mask 0 and
    sampler log-prob 0.0, whatever the rollout carries there, so no loss term, ratio, KL, entropy
    or token count sees them."""
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
        if r.policy_mask is not None:
            policy = torch.tensor(r.policy_mask, dtype=torch.bool)  # [C]
            mask[b, start:end] *= policy
            sampler_lp[b, start:end] = sampler_lp[b, start:end].masked_fill(~policy, 0.0)
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)  # [B]
    prompt_lens = torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask,
            "sampler_logprobs": sampler_lp, "advantages": advantages, "prompt_lens": prompt_lens}


def micro_batch_logprobs(model, batch: dict[str, torch.Tensor], c: slice, temperature: float, chunk_tokens: int,
                         prompt_lens: torch.Tensor | None, packed: bool, routing=None, with_entropy: bool = False):
    """Log-probs (and entropy) [b, S-1] of the rows `c` of a collated batch: packed into one row
    when `packed`, the model allows it (`packing_supported`) and the rows are padded enough to gain
    from it (`worth_packing`), else right-padded; `prompt_lens` [B] (None: off) runs each distinct
    prompt once where the model allows it: always when packed (the shared-prompt packed row is one
    ordinary forward, so DDP/FSDP wrappers and activation checkpointing take it as they are),
    else where `shared_prompt_supported`."""
    ids, attention = batch["input_ids"][c], batch["attention_mask"][c]
    if packed and packing_supported(model) and worth_packing(attention):
        return packed_logprobs(model, ids, attention, batch["prompt_lens"][c], temperature, with_entropy, chunk_tokens,
                               routing, share_prompts=prompt_lens is not None)
    return token_logprobs(model, ids, attention, temperature, with_entropy=with_entropy, chunk=chunk_tokens,
                          prompt_lens=_rows(prompt_lens, c), routing=routing)


@torch.no_grad()
def frozen_logprobs(model, batch: dict[str, torch.Tensor], chunks: list[slice], temperature: float,
                    chunk_tokens: int, prompt_lens: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
    """Log-probs of the whole batch without grad (old policy, or the reference model); [B, S-1].
    `prompt_lens` [B] turns on shared-prompt forwards, `packed` padding-free ones."""
    return torch.cat([micro_batch_logprobs(model, batch, c, temperature, chunk_tokens, prompt_lens, packed)[0]
                      for c in chunks])


def plan_micro_batches(attention_mask: torch.Tensor, tr: TrainerConfig, packed: bool) -> list[slice]:
    """The micro-batches of a collated batch ([B, S] attention mask): `packing.micro_batches` by
    `trainer.micro_batch_size` and `trainer.max_tokens_per_micro_batch`, cut further where another
    process has more (DDP and FSDP run collectives in every forward and backward)."""
    chunks = micro_batches(attention_mask.sum(-1).tolist(), tr.micro_batch_size, tr.max_tokens_per_micro_batch,
                           packed)
    most = int(all_reduce_tensor(torch.tensor([float(len(chunks))]), "max")[0])
    chunks = split_to(chunks, most)
    if len(chunks) < most:
        raise ValueError(f"trainer.max_tokens_per_micro_batch={tr.max_tokens_per_micro_batch}: this process has "
                         f"{len(chunks)} sequences and another needs {most} micro-batches; raise the budget")
    return chunks


def _rows(t: torch.Tensor | None, c: slice | torch.Tensor | None) -> torch.Tensor | None:
    return t[c] if t is not None and c is not None else t


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


@dataclass
class _Plan:
    """One update's batch on the device and how it is cut: micro-batches, the loss normaliser,
    the experts to replay and the shared-prompt lengths."""

    batch: dict[str, torch.Tensor]
    chunks: list[slice]
    normalizer: float
    total_tokens: float
    moe: RouterControl | None
    replay: tuple[torch.Tensor, torch.Tensor] | None  # [B, S, L, k] experts to impose and [B, S] where known
    prompt_lens: torch.Tensor | None  # [B]: shared-prompt forwards
    packed: bool = False  # padding-free micro-batches (grpo/algo/packing.py)

    def scope(self, c: slice, **kw):
        """The routing scope of one micro-batch forward (a no-op for dense models)."""
        if self.moe is None:
            return contextlib.nullcontext(None)
        rep = (self.replay[0][c], self.replay[1][c]) if self.replay is not None else (None, None)
        return self.moe.scope(self.batch["attention_mask"][c], *rep, keep_logits=self.moe.cfg.aux_loss_coef > 0, **kw)

    def subset(self, rows: torch.Tensor, tr: TrainerConfig, normalizer: float) -> _Plan:
        """The plan of the rows `rows` [b] (a mini-batch), cut into its own micro-batches."""
        batch = {k: v[rows] for k, v in self.batch.items()}
        chunks = plan_micro_batches(batch["attention_mask"], tr, self.packed)
        replay = tuple(t[rows] for t in self.replay) if self.replay is not None else None
        return _Plan(batch, chunks, normalizer, max(batch["mask"].sum().item(), 1.0), self.moe, replay,
                     _rows(self.prompt_lens, rows), self.packed)

    def forward(self, model, c: slice, temperature: float, chunk_tokens: int, sc, with_entropy: bool = False):
        return micro_batch_logprobs(model, self.batch, c, temperature, chunk_tokens, self.prompt_lens, self.packed,
                                    routing=sc, with_entropy=with_entropy)


def _global_normalizer(normalizer_of, mask: torch.Tensor, max_new_tokens: int) -> float:
    """Every normaliser is additive over rows (tokens, sequences, sequences x L_max): sum over ranks,
    clamp once, divide by the world size (gradients are averaged over ranks)."""
    local = normalizer_of(mask, max_new_tokens) if bool(mask.any()) else 0.0
    return max(all_reduce_sum(local), 1.0) / world_size()


def mini_batch_rows(rollouts: list[Rollout], parts: int) -> list[torch.Tensor]:
    """Row indices [b] of each of this process's mini-batches.

    When the process holds at least `parts` groups, mini-batches are runs of whole groups, in
    order, as equal as they divide. When it holds fewer (R1-Zero's 512 prompts over 512 trainer
    processes: one group each, 16 mini-batches), each group's outputs are dealt out in turn:
    output j of every group goes to mini-batch j mod parts, so every mini-batch sees every group of
    the process; advantages were computed over whole groups before, so they are unchanged. There
    are never more parts than outputs in a group, nor empty mini-batches (e.g. after DAPO's dynamic
    sampling came up short).

    >>> from rollout.base import Rollout
    >>> rs = [Rollout(g, (1,), (2,), "", (0.0,), "stop") for g in (0, 0, 1, 1, 2, 2)]
    >>> [t.tolist() for t in mini_batch_rows(rs, 2)]
    [[0, 1], [2, 3, 4, 5]]
    >>> rs = [Rollout(g, (1,), (2,), "", (0.0,), "stop") for g in (0, 0, 0, 0, 1, 1, 1, 1)]
    >>> [t.tolist() for t in mini_batch_rows(rs, 4)]
    [[0, 4], [1, 5], [2, 6], [3, 7]]
    >>> [t.tolist() for t in mini_batch_rows(rs, 3)]
    [[0, 3, 4, 7], [1, 5], [2, 6]]
    """
    groups = sorted({r.group for r in rollouts})
    if len(groups) >= parts or not rollouts:
        parts = max(1, min(parts, len(groups)))
        bounds = [len(groups) * i // parts for i in range(parts + 1)]
        rows = []
        for i in range(parts):
            members = set(groups[bounds[i]: bounds[i + 1]])
            rows.append(torch.tensor([b for b, r in enumerate(rollouts) if r.group in members], dtype=torch.long))
        return rows
    seen: dict[int, int] = {}  # group -> outputs of it dealt so far
    dealt: list[list[int]] = [[] for _ in range(parts)]
    for b, r in enumerate(rollouts):
        j = seen.get(r.group, 0)
        seen[r.group] = j + 1
        dealt[j % parts].append(b)
    return [torch.tensor(sorted(rows), dtype=torch.long) for rows in dealt if rows]


def mini_batch_count(rollouts: list[Rollout], parts: int) -> int:
    """Optimizer steps one pass over `rollouts` takes (`mini_batch_rows`' length)."""
    groups = len({r.group for r in rollouts})
    if groups >= parts or not rollouts:
        return max(1, min(parts, groups))
    return min(parts, max(Counter(r.group for r in rollouts).values()))


def _plan(model, rollouts: list[Rollout], cfg: RunConfig, normalizer_of, pad_id: int, device: torch.device,
          moe: RouterControl | None, max_new_tokens: int) -> _Plan:
    algo, tr = cfg.algorithm, cfg.trainer
    batch = {k: v.to(device) for k, v in collate(rollouts, pad_id, algo.overlong_filter).items()}
    packed = tr.max_tokens_per_micro_batch is not None and packing_supported(model)
    chunks = plan_micro_batches(batch["attention_mask"], tr, packed)
    normalizer = _global_normalizer(normalizer_of, batch["mask"], max_new_tokens)
    moe = moe if moe is not None and moe.is_moe else None
    shared, replay = tr.shared_prompt_forward, None
    if moe is not None and moe.cfg.routing_replay == "R3":
        replay = replay_from_rollouts(rollouts, batch["input_ids"].shape[1])
        if replay is None:
            raise ValueError("moe.routing_replay=R3 needs the rollout engine to record routing")
        replay = tuple(t.to(device) for t in replay)
        if shared and not prompt_routing_agrees(rollouts):
            shared = False  # the sampler routed a shared prompt differently per row: replay each row's own
    return _Plan(batch, chunks, normalizer, max(batch["mask"].sum().item(), 1.0), moe, replay,
                 batch["prompt_lens"] if shared else None, packed)


@torch.no_grad()
def _old_logprobs(model, plan: _Plan, cfg: RunConfig) -> torch.Tensor:
    """Log-probs of the batch before the first optimizer step (when there are several); under R2
    the experts they used become the replay of the later steps."""
    olds, recorded = [], []
    for c in plan.chunks:
        with plan.scope(c, count=False) as sc:
            olds.append(plan.forward(model, c, cfg.rollout.temperature, cfg.algorithm.logprob_chunk, sc)[0])
        if sc is not None:
            recorded.append(sc.used_experts().view(*plan.batch["input_ids"][c].shape, len(plan.moe.routers), -1))
    if plan.moe is not None and plan.moe.cfg.routing_replay == "R2":
        plan.replay = (torch.cat(recorded), torch.ones_like(plan.batch["attention_mask"], dtype=torch.bool))
    return torch.cat(olds)  # [B, S-1]


@contextlib.contextmanager
def _training_flag(modules: list):
    """Inside: `modules` (each in eval mode) flagged as training, themselves only, not their children."""
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m in modules:
            m.training = False


def _checkpointed_layers(model):
    """Inside: the layers transformers' gradient_checkpointing_enable marked checkpoint their
    forwards. They do so only in training mode, and the policy stays in eval mode (no dropout, the
    sampler's behaviour); so only those layer modules themselves are flagged as training here."""
    return _training_flag([m for m in model.modules()
                           if getattr(m, "gradient_checkpointing", False) is True and not m.training])


def _reference(ref_model):
    """The module reference log-probs come from: `ref_model` itself, or, for a LoRA run's
    `grpo.model.lora.BaseOfPolicy`, the policy with its adapters off (inside its `adapters_off`)."""
    off = getattr(ref_model, "adapters_off", None)
    return off() if off is not None else contextlib.nullcontext(ref_model)


def _adapter_dropout(model):
    """Inside: a peft model's adapter dropout modules act (idle in eval mode, where the policy stays,
    as the sampler runs it; so old, reference and sampler log-probs never see dropout)."""
    inner = getattr(model, "module", model)  # DDP
    return _training_flag([m for name, m in inner.named_modules() if isinstance(m, torch.nn.Dropout)
                           and ".lora_dropout." in name and not m.training] if hasattr(inner, "peft_config") else [])


def _memory_scope(model, tr: TrainerConfig):
    """Where one micro-batch's forward and backward keep their activations (and LoRA's adapter
    dropout acts, `_adapter_dropout`): checkpointed layers
    (trainer.gradient_checkpointing) and/or host memory (trainer.activation_offload: the tensors
    autograd saves, with checkpointing only the layers' inputs, move to CPU, pinned on GPUs)."""
    stack = contextlib.ExitStack()
    stack.enter_context(_adapter_dropout(model))  # LoRA's dropout: gradient forwards only
    if tr.gradient_checkpointing:
        stack.enter_context(_checkpointed_layers(model))
    if tr.activation_offload:
        stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
    return stack


def _accumulate(model, plan: _Plan, cfg: RunConfig, loss_fn, old, ref, sums: dict[str, float],
                tokens: dict | None = None) -> None:
    """One pass of micro-batch forwards and backwards; the loss metrics, token-weighted, go to `sums`
    (and, with `tokens`, each position's log-prob and entropy: see `policy_update`)."""
    for c in plan.chunks:
        with _memory_scope(model, cfg.trainer):
            _micro_batch(model, plan, c, cfg, loss_fn, old, ref, sums, tokens)


def _micro_batch(model, plan: _Plan, c: slice, cfg: RunConfig, loss_fn, old, ref, sums: dict[str, float],
                 tokens: dict | None = None) -> None:
    """Forward and backward of one micro-batch. The backward runs in a routing scope of its own
    (replay on, nothing counted) so that a checkpointed layer's recomputed forward routes its
    tokens to the experts the forward used."""
    batch, moe = plan.batch, plan.moe
    mask = batch["mask"][c]  # [b, S-1]
    with plan.scope(c) as sc:
        logprobs, entropy = plan.forward(model, c, cfg.rollout.temperature, cfg.algorithm.logprob_chunk, sc,
                                         with_entropy=True)  # [b, S-1] x2
    old_lp = old[c] if old is not None else logprobs.detach()  # [b, S-1]
    if tokens is not None:  # rows of the whole batch this micro-batch holds
        rows = tokens["rows"][c]
        tokens["logprobs"][rows] = logprobs.detach().float().cpu()
        tokens["entropy"][rows] = entropy.detach().float().cpu()
    loss, metrics = loss_fn(logprobs, old_lp, batch["advantages"][c], mask, normalizer=plan.normalizer,
                            sampler_logprobs=batch["sampler_logprobs"][c],
                            ref_logprobs=ref[c] if ref is not None else None)
    aux = moe.aux_loss(sc) if sc is not None else None
    if aux is not None:  # weighted by this micro-batch's share of the rank's tokens
        share = batch["attention_mask"][c].sum() / batch["attention_mask"].sum()
        loss = loss + moe.cfg.aux_loss_coef * aux * share
        metrics["train/moe_aux_loss"] = aux.item()
    with plan.scope(c, count=False) as back:
        if back is not None and sc.parts and all(p is sc.parts[0] for p in sc.parts):
            back.set_part(sc.parts[0])  # a checkpointed layer's recompute replays the forward's token layout
        loss.backward()
    beat()  # progress for the watchdog
    metrics["train/loss"] = loss.item()
    metrics["train/entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
    _merge(sums, metrics, mask.sum().item() / plan.total_tokens)


def _mini_batches(plan: _Plan, rollouts: list[Rollout], cfg: RunConfig, normalizer_of,
                  max_new_tokens: int) -> list[tuple[_Plan, torch.Tensor | None]]:
    """(plan, rows) of each mini-batch; one mini-batch is the whole plan itself (rows None)."""
    if cfg.algorithm.mini_batches == 1:
        return [(plan, None)]
    out = []
    for rows in mini_batch_rows(rollouts, cfg.algorithm.mini_batches):
        rows = rows.to(plan.batch["mask"].device)
        normalizer = _global_normalizer(normalizer_of, plan.batch["mask"][rows], max_new_tokens)
        out.append((plan.subset(rows, cfg.trainer, normalizer), rows))
    return out


def optimizer_steps_per_batch(algo: AlgorithmConfig) -> int:
    """Optimizer steps one generation batch is trained with (what the learning-rate schedule counts)."""
    return algo.num_iterations * algo.mini_batches


def policy_update(model, optimizer, rollouts: list[Rollout], cfg: RunConfig, pad_id: int,
                  device: torch.device, ref_model=None, moe: RouterControl | None = None,
                  schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                  max_new_tokens: int | None = None, tokens: dict | None = None) -> dict[str, float]:
    """`algorithm.num_iterations` passes over the batch, each of `algorithm.mini_batches` optimizer
    steps on mini-batches (`mini_batch_rows`), in micro-batches with accumulation.

    `ref_model` is the frozen reference policy, needed only when `algorithm.beta > 0` (a LoRA run's
    is `grpo.model.lora.BaseOfPolicy`: the policy with its adapters off).
    Under several processes `rollouts` is this rank's share; the normaliser counts the global
    mini-batch divided by the world size, because DDP/FSDP average gradients over ranks. With `moe`,
    each forward runs inside a routing scope (replay R2/R3, aux loss, expert-load counts). A
    non-finite loss or gradient norm skips that optimizer step and the rest of the batch's
    (`train/skipped` = 1). `schedule` steps after every optimizer step taken. `max_new_tokens`: the
    length cap the batch was generated with (Dr. GRPO's normaliser; None: `rollout.max_new_tokens`).
    The loss metrics are means over the optimizer steps; `train/grad_norm` is the last step's.
    `tokens` (an empty dict, for the dashboard's per-token view): filled with "logprobs" and
    "entropy" [B, S-1] (float32, CPU, the collate layout: entry t scores token t+1), both of the
    policy before the update (the first pass's forwards, or the old log-probs when they are computed).
    """
    algo, tr = cfg.algorithm, cfg.trainer
    max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
    loss_fn, normalizer_of = objective_from_config(algo, off_policy=tr.max_staleness > 0)
    plan = _plan(model, rollouts, cfg, normalizer_of, pad_id, device, moe, max_new_tokens)
    steps = algo.num_iterations * mini_batch_count(rollouts, algo.mini_batches)
    old = _old_logprobs(model, plan, cfg) if steps > 1 else None
    ref = None
    if algo.beta > 0:
        if ref_model is None:
            raise ValueError("algorithm.beta > 0 needs a reference model")
        with _reference(ref_model) as reference:  # LoRA: the policy itself, adapters off
            ref = frozen_logprobs(reference, plan.batch, plan.chunks, cfg.rollout.temperature, algo.logprob_chunk,
                                  plan.prompt_lens, plan.packed)
    minis = _mini_batches(plan, rollouts, cfg, normalizer_of, max_new_tokens)  # after R2 recorded its replay

    if tokens is not None:
        shape = plan.batch["mask"].shape
        tokens.update(logprobs=torch.zeros(shape), entropy=torch.zeros(shape))
    sums: dict[str, float] = {}
    skipped = 0.0
    for iteration in range(algo.num_iterations):
        for mini, rows in minis:
            optimizer.zero_grad(set_to_none=True)
            record = None
            if tokens is not None and iteration == 0:
                record = {**tokens, "rows": rows.cpu() if rows is not None else torch.arange(len(rollouts))}
            _accumulate(model, mini, cfg, loss_fn, _rows(old, rows), _rows(ref, rows), sums, record)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP2
            if not (math.isfinite(grad_norm) and math.isfinite(all_reduce_sum(sums.get("train/loss", 0.0)))):
                optimizer.zero_grad(set_to_none=True)  # every rank sees the same all-reduced values
                skipped = 1.0
                break
            optimizer.step()
            if schedule is not None:
                schedule.step()
        if skipped:
            break
    if tokens is not None and old is not None:  # later mini-batches ran after earlier steps: the old policy's
        tokens["logprobs"] = old.detach().float().cpu()
    sums = {k: v if k.endswith(("_min", "_max")) else v / steps for k, v in sums.items()}
    sums["train/grad_norm"] = grad_norm
    sums["train/overlong_filtered_frac"] = 1.0 - plan.batch["mask"].sum().item() / max(
        sum(r.num_completion_tokens for r in rollouts), 1)
    sums["train/skipped"] = skipped
    return sums
