"""One GRPO step as a unit: prompts -> generate -> score -> advantages -> update -> sync weights.

    batch  = collect_rollouts(ctx, step)     draw this rank's prompts (PromptGroup records), sample
                                             G completions of each, score them (DAPO's dynamic
                                             sampling draws more rounds when it is on)
    result = learn(ctx, step, batch)         advantages over the global batch, the policy update
                                             between the engine's `before_update` / `after_update`,
                                             the new weights pushed to the engine, the step's metrics
    run_step(ctx, step) = learn(ctx, step, collect_rollouts(ctx, step))

`grpo.train.train` builds a `StepContext` once and calls `run_step` for every step; the benchmark
`bench/step_vs_trl.py` calls the same function. Records flow one way: a `PromptGroup` carries a
prompt (its row, rendered text, token ids, sampling seed and global index) through the step; the
`Rollout`s it produces index their group with `Rollout.group`.

Seeds: group i of sampling round r of step s samples with `group_seed(seed, s, first + i, r)`,
where `first` is this rank's first global prompt index, so a group samples the same completions
whichever rank (and however many) sample it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from grpo.advantages import assign_advantages
from grpo.config import RunConfig
from grpo.data import PromptSampler, render_prompts
from grpo.distributed import all_reduce_tensor, group_seed, reduce_metrics
from grpo.evaluate import is_correct
from grpo.moe import RouterControl, load_metrics
from grpo.sampling import sample_batch
from grpo.update import policy_update
from rewards import RewardSpec, Scorer
from rollout.base import Rollout, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class PromptGroup:
    """One prompt of a step and everything the step needs about it."""

    index: int  # global index of the prompt in the step's batch (over every rank)
    row: dict  # the data row (gold answer, metadata)
    text: str  # the rendered prompt
    token_ids: tuple[int, ...]
    seed: int  # the sampling seed of its G completions


@dataclass(frozen=True)
class RolloutBatch:
    """This rank's scored groups of one step; `rollouts[i].group` indexes `groups`."""

    groups: tuple[PromptGroup, ...]
    rollouts: list[Rollout]
    metrics: dict[str, float]  # reward metrics (of the first round) and dynamic-sampling metrics
    generate_s: float  # drawing, encoding and sampling
    score_s: float
    policy_version: int = 0  # optimizer steps taken by the weights that sampled it
    generation_wait_s: float = 0.0  # asynchronous RL: the generation side waited this long for those weights
    update_wait_s: float = 0.0  # asynchronous RL: the trainer waited this long for this batch


@dataclass(frozen=True)
class StepResult:
    step: int
    batch: RolloutBatch  # its rollouts carry their advantages
    metrics: dict[str, float]  # what the step logs (averaged over ranks, expert loads summed)
    skipped: bool  # the loss or gradient norm was not finite: no optimizer step was taken


@dataclass
class StepContext:
    """What one step works with; built once per run (by `grpo.train` or a benchmark)."""

    cfg: RunConfig
    engine: RolloutEngine
    scorer: Scorer
    tokenizer: object
    prompts: PromptSampler
    model: torch.nn.Module  # the trainer's module (wrapped by accelerate or sharded)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    moe: RouterControl
    ref_model: torch.nn.Module | None = None
    batch: slice = field(default_factory=lambda: slice(0, None))  # this rank's share of the global prompts
    sampling: SamplingParams | None = None  # None: from cfg.rollout (a benchmark may set ignore_eos)

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = sampling_params(self.cfg, record_routing=self.moe.is_moe and self.cfg.moe.routing_replay == "R3")


def sampling_params(cfg: RunConfig, prompt_seeds: list[int] = (), record_routing: bool = False) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                          top_k=ro.top_k, stop=tuple(ro.stop), prompt_seeds=tuple(prompt_seeds),
                          record_routing=record_routing)


def run_step(ctx: StepContext, step: int) -> StepResult:
    """One whole step: sample, score, then learn from what was sampled."""
    return learn(ctx, step, collect_rollouts(ctx, step))


# --- the rollout half ---------------------------------------------------------------------------


def prompt_groups(ctx: StepContext, rows: list[dict], step: int, sampling_round: int) -> list[PromptGroup]:
    """Render and encode `rows` once; group i gets its seed for `sampling_round` of `step`."""
    first = ctx.batch.start or 0
    texts = render_prompts(ctx.cfg.data, rows, ctx.tokenizer)
    return [PromptGroup(index=first + i, row=row, text=text,
                        token_ids=tuple(ctx.tokenizer.encode(text, add_special_tokens=False)),
                        seed=group_seed(ctx.cfg.trainer.seed, step, first + i, sampling_round))
            for i, (row, text) in enumerate(zip(rows, texts))]


def make_scorer(cfg: RunConfig) -> Scorer:
    """The training rewards; a reward that `eval.correct` names and the recipe does not train on
    is scored too, with weight 0, so that `rollout/accuracy` means what evaluation means."""
    r = cfg.rewards
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in r.functions]
    specs += [RewardSpec(name, 0.0) for name in cfg.eval.correct if name not in {f.name for f in r.functions}]
    return Scorer(specs, workers=r.workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb,
                  timeout_score=r.timeout_score, error_score=r.error_score, fail_fast=r.fail_fast)


def score_rollouts(scorer: Scorer, rollouts: list[Rollout], groups: list[PromptGroup],
                   max_tokens: int) -> tuple[list[Rollout], dict[str, float]]:
    """Attach per-function rewards and the weighted total to every rollout. A sample is named
    `prompt P completion J (#I)`: P the prompt's global index in the step, J the completion's in its
    group, I the sample's in this call."""
    seen: dict[int, int] = {}
    contexts = []
    for i, r in enumerate(rollouts):
        j = seen[r.group] = seen.get(r.group, -1) + 1
        contexts.append({"prompt": groups[r.group].text, "finish_reason": r.finish_reason,
                         "num_tokens": r.num_completion_tokens, "max_tokens": max_tokens,
                         "sample_id": f"prompt {groups[r.group].index} completion {j} (#{i})"})
    result = scorer.score([r.text for r in rollouts], [groups[r.group].row for r in rollouts], contexts)
    scored = [
        replace(r, example=groups[r.group].row, reward=result.total[i],
                rewards={name: values[i] for name, values in result.per_function.items()})
        for i, r in enumerate(rollouts)
    ]
    return scored, result.metrics


def collect_rollouts(ctx: StepContext, step: int, policy_version: int | None = None) -> RolloutBatch:
    """This rank's prompts of `step`, G completions each, scored (more rounds under dynamic sampling).
    `policy_version`: the optimizer steps the engine's weights have taken (synchronous: step - 1)."""
    cfg, seconds = ctx.cfg, {"generate": 0.0, "score": 0.0}
    version = step - 1 if policy_version is None else policy_version
    rounds = iter(range(cfg.algorithm.max_sampling_attempts + 1))

    def draw(n: int) -> list[PromptGroup]:
        t = time.perf_counter()
        groups = prompt_groups(ctx, ctx.prompts.next_batch(n)[ctx.batch], step, next(rounds))
        seconds["generate"] += time.perf_counter() - t
        return groups

    def generate_and_score(groups: list[PromptGroup]) -> tuple[list[Rollout], dict[str, float]]:
        t = time.perf_counter()
        sampling = replace(ctx.sampling, prompt_seeds=tuple(g.seed for g in groups))
        rollouts = ctx.engine.generate([g.token_ids for g in groups], cfg.rollout.group_size, sampling)
        rollouts = [replace(r, policy_version=version) for r in rollouts]
        ts = time.perf_counter()
        scored = score_rollouts(ctx.scorer, rollouts, groups, cfg.rollout.max_new_tokens)
        seconds["generate"] += ts - t
        seconds["score"] += time.perf_counter() - ts
        return scored

    groups, rollouts, metrics = sample_batch(generate_and_score, draw, cfg.trainer.prompts_per_step,
                                             dynamic=cfg.algorithm.dynamic_sampling,
                                             max_attempts=cfg.algorithm.max_sampling_attempts)
    first = ctx.batch.start or 0  # kept groups are renumbered: their index is their place in the batch
    groups = tuple(replace(g, index=first + i) for i, g in enumerate(groups))
    return RolloutBatch(groups, rollouts, metrics, seconds["generate"], seconds["score"], version)


# --- the learning half --------------------------------------------------------------------------


def update_policy(ctx: StepContext, rollouts: list[Rollout]) -> tuple[dict[str, float], bool]:
    """The policy update between the engine's phase hooks, then the new weights pushed to it.
    Returns the update's metrics (with its seconds) and whether it was skipped (not finite)."""
    cfg = ctx.cfg
    t = time.perf_counter()
    ctx.engine.before_update()
    metrics = policy_update(ctx.model, ctx.optimizer, rollouts, cfg, ctx.tokenizer.pad_token_id, ctx.device,
                            ref_model=ctx.ref_model, moe=ctx.moe)
    skipped = metrics.pop("train/skipped") > 0
    if not skipped:
        ctx.schedule.step()
    t_sync = time.perf_counter()
    sync_engine(ctx.engine, ctx.model, ctx.unwrapped)
    ctx.engine.after_update()
    metrics.update({"time/train": t_sync - t, "time/weight_sync": time.perf_counter() - t_sync})
    return metrics, skipped


def sync_engine(engine: RolloutEngine, model, unwrapped) -> None:
    """Push the policy's weights to an engine that keeps its own (nothing to do when it decodes
    with the policy module itself)."""
    from grpo.checkpoint import full_model_state

    engine_model = getattr(engine, "model", None)  # the HF engine decodes with a module; vLLM has its own
    if engine_model is unwrapped:  # colocated, same tensors: nothing to copy
        return
    full = full_model_state(model, every_rank=True)  # a collective under FSDP2
    if engine_model is not None:
        own = dict(engine_model.named_parameters())
        full = {k: v for k, v in full.items() if k in own}
    engine.update_weights(full.items())


def learn(ctx: StepContext, step: int, batch: RolloutBatch) -> StepResult:
    """Advantages over the global batch, the update, the weight push and the step's metrics."""
    cfg, started = ctx.cfg, time.perf_counter()
    rollouts, adv_metrics = assign_advantages(batch.rollouts, cfg.algorithm, cfg.rollout.group_size,
                                              cfg.rollout.max_new_tokens)
    lr = ctx.schedule.get_last_lr()[0]  # the rate this update uses (the schedule steps after it)
    train_metrics, skipped = update_policy(ctx, rollouts)
    # synchronous: the step waited for its own generation; asynchronous: only for what was not ready
    waited = batch.update_wait_s if cfg.trainer.max_staleness else batch.generate_s + batch.score_s
    metrics = reduce_metrics({**batch.metrics, **train_metrics, **rollout_metrics(rollouts, cfg, batch.generate_s),
                              **thinking_metrics(rollouts, [g.text for g in batch.groups], ctx.tokenizer),
                              "time/generate": batch.generate_s, "time/score": batch.score_s,
                              "time/step": waited + time.perf_counter() - started})
    if cfg.trainer.max_staleness:
        metrics.update(async_metrics(step, batch))
    metrics.update(adv_metrics, **{"train/lr": lr})
    counts = ctx.moe.take_counts()
    if counts is not None:
        metrics.update(load_metrics(all_reduce_tensor(counts)))
    return StepResult(step, replace(batch, rollouts=rollouts), metrics, skipped)


def rollout_metrics(rollouts: list[Rollout], cfg: RunConfig, seconds: float) -> dict[str, float]:
    """Lengths, truncation, throughput and accuracy (`eval.correct`: the same definition as evaluation)."""
    lengths = [r.num_completion_tokens for r in rollouts]
    return {
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        "rollout/accuracy": sum(is_correct(r.rewards, cfg.eval.correct) for r in rollouts) / len(rollouts),
    }


def thinking_metrics(rollouts: list[Rollout], prompts: list[str], tokenizer) -> dict[str, float]:
    """R1-Zero's signature: tokens inside the thinking block per completion (0 without a closed
    block), and the share of completions whose arithmetic steps there are consistent
    (`rewards.thinking`: bounded, linear, nothing evaluated)."""
    from rewards.thinking import steps_consistent, written_think

    blocks = [written_think(r.text, prompts[r.group]) or "" for r in rollouts]
    filled = [b for b in blocks if b]
    counts = iter(len(ids) for ids in tokenizer(filled, add_special_tokens=False)["input_ids"]) if filled else iter(())
    tokens = [next(counts) if b else 0 for b in blocks]
    return {"rollout/think_tokens_mean": sum(tokens) / len(tokens),
            "rollout/think_consistent": sum(steps_consistent(r.text, prompts[r.group]) for r in rollouts) / len(rollouts)}


def async_metrics(step: int, batch: RolloutBatch) -> dict[str, float]:
    """Asynchronous RL: how stale the batch was (policy versions behind the weights being updated)
    and how long each side waited for the other."""
    staleness = [step - 1 - r.policy_version for r in batch.rollouts]
    return {"async/staleness_mean": sum(staleness) / len(staleness), "async/staleness_max": float(max(staleness)),
            "time/generation_wait": batch.generation_wait_s, "time/update_wait": batch.update_wait_s}


def rollout_rows(result: StepResult, group_size: int) -> list[dict]:
    """This rank's rollouts of a step as tracker rows; `group` is the global prompt index."""
    groups = result.batch.groups
    return [
        {"step": result.step, "group": groups[r.group].index, "index": i % group_size, "prompt": groups[r.group].text,
         "completion": r.text, "answer": str(r.example.get("answer", "")), "rewards": r.rewards, "reward": r.reward,
         "advantage": r.advantage, "finish_reason": r.finish_reason, "num_tokens": r.num_completion_tokens,
         "policy_version": r.policy_version}
        for i, r in enumerate(result.batch.rollouts)
    ]
