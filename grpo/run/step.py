"""One GRPO step as a unit: prompts -> generate -> score -> advantages -> update -> sync weights.

    batch  = collect_rollouts(ctx.sampling, step)   the sampling half (`grpo.run.sampling`): this rank's
                                                    prompts, G completions each, scored
    result = learn(ctx.learning, step, batch)       advantages over the global batch, the policy update
                                                    between the engine's `before_update` / `after_update`,
                                                    the new weights pushed to the engine, the step's metrics
    run_step(ctx, step) = learn(ctx.learning, step, collect_rollouts(ctx.sampling, step))

`grpo.run.train.train` builds a `StepContext` once and calls `run_step` for every step; the benchmark
`bench/step_vs_trl.py` calls the same function. Under asynchronous RL the generation process runs
the sampling half (`grpo.run.async_rollouts`) and the trainer calls `learn` on what it sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from grpo.algo.advantages import assign_advantages
from grpo.algo.moe import RouterControl, load_metrics
from grpo.algo.update import policy_update
from grpo.collectives import all_reduce_tensor, reduce_metrics
from grpo.config import ModelConfig, RunConfig
from grpo.data.prompts import correct_rewards
from grpo.phases import phase
from grpo.run.sampling import RolloutBatch, SamplingContext, collect_rollouts
from rewards import is_correct
from rollout.base import Rollout, RolloutEngine


@dataclass(frozen=True)
class StepResult:
    step: int
    batch: RolloutBatch  # its rollouts carry their advantages
    metrics: dict[str, float]  # what the step logs (averaged over ranks, expert loads summed)
    skipped: bool  # the loss or gradient norm was not finite: no optimizer step was taken
    tokens: dict | None = None  # steps whose rollouts are logged: the trainer's per-position log-probs and entropy


@dataclass
class LearningContext:
    """What the learning half works with: the policy, its optimizer and schedule, the reference, the
    MoE router control, and the engine that receives the new weights after each update."""

    cfg: RunConfig
    engine: RolloutEngine  # receives the weights (the same engine as sampling's in a synchronous run)
    tokenizer: object
    model: torch.nn.Module  # the trainer's module (wrapped by accelerate or sharded)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    moe: RouterControl
    ref_model: torch.nn.Module | None = None


@dataclass
class StepContext:
    """Both halves of a synchronous step (`run_step`)."""

    sampling: SamplingContext
    learning: LearningContext


def run_step(ctx: StepContext, step: int) -> StepResult:
    """One whole step: sample, score, then learn from what was sampled."""
    return learn(ctx.learning, step, collect_rollouts(ctx.sampling, step))


def update_policy(ctx: LearningContext, rollouts: list[Rollout], max_new_tokens: int | None = None,
                  tokens: dict | None = None) -> tuple[dict[str, float], bool]:
    """The policy update between the engine's phase hooks, then the new weights pushed to it.
    The learning-rate schedule steps once per optimizer step the update takes. `max_new_tokens`:
    the cap the batch was generated with; `tokens`: see `grpo.algo.update.policy_update`. Returns
    the update's metrics (with its seconds) and whether it was skipped (not finite)."""
    cfg = ctx.cfg
    t = time.perf_counter()
    ctx.engine.before_update()
    with phase("learn"):
        metrics = policy_update(ctx.model, ctx.optimizer, rollouts, cfg, ctx.tokenizer.pad_token_id, ctx.device,
                                ref_model=ctx.ref_model, moe=ctx.moe, schedule=ctx.schedule,
                                max_new_tokens=max_new_tokens, tokens=tokens)
    skipped = metrics.pop("train/skipped") > 0
    t_sync = time.perf_counter()
    with phase("push weights"):
        sync_engine(ctx.engine, ctx.model, ctx.unwrapped, lora_sync(cfg.model))
        ctx.engine.after_update()
    metrics.update({"time/train": t_sync - t, "time/weight_sync": time.perf_counter() - t_sync})
    return metrics, skipped


def lora_sync(model: ModelConfig) -> str | None:
    """How a LoRA run pushes its policy to the engine (`model.lora.sync`); None: full weights."""
    return model.lora.sync if model.lora is not None else None


def sync_engine(engine: RolloutEngine, model, unwrapped, lora: str | None = None) -> None:
    """Push the policy's weights to an engine that keeps its own (nothing to do when it decodes
    with the policy module itself). A LoRA policy (`lora`: `model.lora.sync`) pushes its adapter
    (a new version) to an engine that takes adapters (`takes_adapters`), else its merged weights
    (e.g. vLLM's CPU build with an MoE model, see `rollout.make_engine`)."""
    from grpo.model.lora import adapter_payload, merged_state
    from grpo.run.checkpoint import full_model_state, lora_state

    engine_model = getattr(engine, "model", None)  # the HF engine decodes with a module; vLLM has its own
    if engine_model is unwrapped:  # colocated, same tensors: nothing to copy
        return
    if lora == "adapter" and engine_model is None and getattr(engine, "takes_adapters", False):
        engine.update_adapter(*adapter_payload(unwrapped, lora_state(model, every_rank=True)))  # gathered under FSDP2
        return
    if lora is not None and engine_model is None:  # an engine without adapters: the merged weights
        engine.update_weights(merged_state(unwrapped).items())
        return
    full = full_model_state(model, every_rank=True)  # a collective under FSDP2
    if engine_model is not None:
        own = dict(engine_model.named_parameters())
        full = {k: v for k, v in full.items() if k in own}
    engine.update_weights(full.items())


def refresh_reference(ctx: LearningContext, step: int) -> bool:
    """Every `algorithm.ref_refresh_steps` steps the reference policy becomes the current policy
    (DeepSeek-R1: every 400 steps), after that step's update; returns whether it did. A collective
    under FSDP2 (the full weights are gathered on every rank)."""
    every = ctx.cfg.algorithm.ref_refresh_steps
    if ctx.ref_model is None or not every or step % every:
        return False
    from grpo.run.checkpoint import full_model_state

    ctx.ref_model.load_state_dict(full_model_state(ctx.model, every_rank=True))
    return True


def learn(ctx: LearningContext, step: int, batch: RolloutBatch) -> StepResult:
    """Advantages over the global batch, the update, the weight push and the step's metrics."""
    cfg, started = ctx.cfg, time.perf_counter()
    new_tokens = cfg.rollout.max_new_tokens_at(step)  # the cap the batch was generated with
    rollouts, adv_metrics = assign_advantages(batch.rollouts, cfg.algorithm, cfg.rollout.group_size, new_tokens)
    lr = ctx.schedule.get_last_lr()[0]  # the rate of this update's first optimizer step
    tokens = {} if logs_rollouts(cfg, step) else None  # for the dashboard's per-token view
    train_metrics, skipped = update_policy(ctx, rollouts, new_tokens, tokens)
    if cfg.algorithm.ref_refresh_steps:
        train_metrics["train/ref_refreshed"] = float(refresh_reference(ctx, step))
    # synchronous: the step waited for its own generation; asynchronous: only for what was not ready
    waited = batch.update_wait_s if cfg.trainer.max_staleness else batch.generate_s + batch.score_s
    correct = correct_rewards(cfg.data, cfg.eval)
    metrics = reduce_metrics({**batch.metrics, **train_metrics, **rollout_metrics(rollouts, correct, batch.generate_s),
                              **thinking_metrics(rollouts, [g.text for g in batch.groups], ctx.tokenizer),
                              "time/generate": batch.generate_s, "time/score": batch.score_s,
                              "time/step": waited + time.perf_counter() - started})
    if cfg.trainer.max_staleness:
        metrics.update(async_metrics(step, batch))
    metrics.update(adv_metrics, **{"train/lr": lr})
    counts = ctx.moe.take_counts()
    if counts is not None:
        metrics.update(load_metrics(all_reduce_tensor(counts)))
    return StepResult(step, replace(batch, rollouts=rollouts), metrics, skipped, tokens or None)


def logs_rollouts(cfg: RunConfig, step: int) -> bool:
    """Whether `step`'s rollouts go to the trackers (every `logging.rollouts_every` steps, and the last)."""
    return step % cfg.logging.rollouts_every == 0 or step == cfg.trainer.steps


def rollout_metrics(rollouts: list[Rollout], correct: Sequence[str], seconds: float) -> dict[str, float]:
    """Lengths, truncation, throughput and accuracy (`eval.correct`: the same definition as evaluation)."""
    lengths = [r.num_completion_tokens for r in rollouts]  # policy tokens (environment tokens are context)
    metrics = {
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        "rollout/accuracy": sum(is_correct(r.rewards, correct) for r in rollouts) / len(rollouts),
        "rollout/degenerate_groups_frac": degenerate_groups_frac(rollouts),
    }
    if any(r.policy_mask is not None for r in rollouts):
        metrics.update(tool_metrics(rollouts))
    return metrics


def tool_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """Multi-turn rollouts: tool calls per completion, the share of calls that failed (an exception
    or non-zero exit) and that ran out of time (or output), policy turns per completion, and the
    environment's tokens per completion (context, not trained on)."""
    calls = sum(r.tool_calls for r in rollouts)
    n = len(rollouts)
    return {"rollout/tool_calls_mean": calls / n,
            "rollout/tool_errors_frac": sum(r.tool_count("error", "killed") for r in rollouts) / max(calls, 1),
            "rollout/tool_timeouts_frac": sum(r.tool_count("timeout", "output_limit") for r in rollouts) / max(calls, 1),
            "rollout/turns_mean": sum(r.turns for r in rollouts) / n,
            "rollout/env_tokens_mean": sum(len(r.completion_ids) - r.num_completion_tokens for r in rollouts) / n}


def degenerate_groups_frac(rollouts: list[Rollout]) -> float:
    """The share of this batch's groups whose completions all got the same reward: their advantages
    are all zero, so they teach nothing (all solved, or all failed)."""
    groups: dict[int, set[float]] = {}
    for r in rollouts:
        groups.setdefault(r.group, set()).add(r.reward)
    return sum(len(rewards) == 1 for rewards in groups.values()) / max(len(groups), 1)


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


MAX_ROW_TOKENS = 2048  # per-token data kept for each logged completion (its first tokens)


def rollout_rows(result: StepResult, group_size: int, tokenizer=None, code: tuple[str, str] | None = None) -> list[dict]:
    """This rank's rollouts of a step as tracker rows; `group` is the global prompt index.

    With `tokenizer`, each row also has the per-token view the dashboard draws, for the first
    `MAX_ROW_TOKENS` completion tokens: `token_text` (each token decoded on its own) and
    `token_logprobs` (the sampler's), and `prompt_tokens` (how many tokens the prompt had); on steps
    whose update recorded them, `token_trainer_logprobs` and `token_entropy` (the trainer's). Multi-turn
    rollouts also have `segments` (`turn_segments`; `code`: the python tool's markers)."""
    groups = result.batch.groups
    rows = [
        {"step": result.step, "group": groups[r.group].index, "index": i % group_size, "prompt": groups[r.group].text,
         "completion": r.text, "answer": str(r.example.get("answer", "")), "rewards": r.rewards, "reward": r.reward,
         "advantage": r.advantage, "finish_reason": r.finish_reason, "num_tokens": r.num_completion_tokens,
         "policy_version": r.policy_version}
        for i, r in enumerate(result.batch.rollouts)
    ]
    if tokenizer is not None:
        for b, (row, r) in enumerate(zip(rows, result.batch.rollouts)):
            ids = list(r.completion_ids[:MAX_ROW_TOKENS])
            row["prompt_tokens"] = len(r.prompt_ids)
            row["token_text"] = tokenizer.batch_decode([[t] for t in ids]) if ids else []
            row["token_logprobs"] = [round(float(lp), 4) for lp in r.logprobs[:MAX_ROW_TOKENS]]
            if r.policy_mask is not None:
                row["segments"] = turn_segments(r, tokenizer, code)
            if result.tokens:  # the trainer's view of the same tokens, before the update
                start = len(r.prompt_ids) - 1  # the collate layout: entry t scores token t + 1
                for key, name in (("logprobs", "token_trainer_logprobs"), ("entropy", "token_entropy")):
                    row[name] = [round(float(v), 4) for v in result.tokens[key][b, start:start + len(ids)]]
    return rows


def turn_segments(r: Rollout, tokenizer, code: tuple[str, str] | None = None) -> list[dict]:
    """A multi-turn completion as its turns, in order: {"kind": "policy" | "code" | "environment",
    "text", "status" (the tool call's, environment turns only)}; the dashboard shows them apart.
    `code`: the python tool's (open, close) markers; the block a policy turn ends with, when a tool
    call answers it, is a "code" piece of its own."""
    out, at = [], 0
    for start, end, status in (*r.env_turns, (len(r.completion_ids), len(r.completion_ids), None)):
        if start > at:
            text = tokenizer.decode(list(r.completion_ids[at:start]), skip_special_tokens=True)
            cut = text.rfind(code[0]) if code and status and text.endswith(code[1]) else -1
            if cut > 0:
                out.append({"kind": "policy", "text": text[:cut]})
            if cut >= 0:
                out.append({"kind": "code", "text": text[cut:]})
            else:
                out.append({"kind": "policy", "text": text})
        if status is not None:
            out.append({"kind": "environment", "status": status,
                        "text": tokenizer.decode(list(r.completion_ids[start:end]), skip_special_tokens=True)})
        at = end
    return out
