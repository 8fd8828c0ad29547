"""The GRPO training loop: sample prompts -> generate -> score -> advantages -> update -> sync -> log.

CPU (the embedded default: a tiny MoE pretrained locally, then RL only; a few minutes on 2 cores):
    grpo train recipes/tiny-cpu.yaml
GPU cluster (see recipes/ for real-model recipes):
    grpo train recipes/<recipe>.yaml --output-dir runs/x

Where this departs from the papers, on purpose:
- The default loss aggregation is DAPO's token mean over the global batch (2503.14476), not
  GRPO's per-sequence mean (2402.03300): long completions are not down-weighted per token.
- No KL penalty by default (beta = 0), as in DAPO and Dr. GRPO: R1-Zero-style runs start from a
  base model and the reference anchor mostly slows learning.
- One optimisation pass per batch by default (num_iterations = 1), so the clipped ratio is 1 and
  the update is REINFORCE with a group baseline; more passes use old log-probs computed once.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from grpo.advantages import group_advantages, overlong_penalty, zero_variance_fraction
from grpo.config import RunConfig, dump_config
from grpo.data import PromptSampler, load_eval_sets, load_rows, render_prompts
from grpo.evaluate import evaluate_greedy, evaluate_step, make_eval_scorer
from grpo.sampling import sample_batch
from grpo.tracking import make_tracker
from grpo.update import policy_update
from rewards import RewardSpec, Scorer
from rollout.base import Rollout, SamplingParams
from rollout import make_engine

log = logging.getLogger(__name__)


# --- set-up helpers (each one call deep from the loop) -----------------------------------------


def load_policy(cfg: RunConfig, device: torch.device):
    """The policy and its tokenizer: a built-in tiny base (built and cached on first use), a Hub
    id or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.tiny import BUILTIN_PREFIX, ensure_tiny_base

    name = cfg.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        name = str(ensure_tiny_base(name[len(BUILTIN_PREFIX) :], progress=cfg.logging.progress))
    kwargs = {"dtype": getattr(torch, cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.experts_implementation:
        kwargs["experts_implementation"] = cfg.model.experts_implementation
    elif device.type == "cpu":
        kwargs["experts_implementation"] = "eager"  # faster than grouped_mm for training on CPU
    tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs).to(device)
    return model, tokenizer


def make_scorer(cfg: RunConfig) -> Scorer:
    r = cfg.rewards
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in r.functions]
    return Scorer(specs, workers=r.workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb,
                  timeout_score=r.timeout_score, error_score=r.error_score, fail_fast=r.fail_fast)


def sampling_params(cfg: RunConfig, seed: int | None) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                          top_k=ro.top_k, stop=tuple(ro.stop), seed=seed)


def encode_prompts(tokenizer, data_cfg, rows: list[dict]) -> tuple[list[str], list[list[int]]]:
    texts = render_prompts(data_cfg, rows, tokenizer)
    return texts, [tokenizer.encode(t, add_special_tokens=False) for t in texts]


# --- the stages of one step --------------------------------------------------------------------


def score_rollouts(scorer: Scorer, rollouts: list[Rollout], rows: list[dict], prompts: list[str],
                   max_tokens: int) -> tuple[list[Rollout], dict[str, float]]:
    """Attach per-function rewards and the weighted total to every rollout."""
    contexts = [
        {"prompt": prompts[r.group], "finish_reason": r.finish_reason, "num_tokens": r.num_completion_tokens,
         "max_tokens": max_tokens, "sample_id": f"group{r.group}/{i}"}
        for i, r in enumerate(rollouts)
    ]
    result = scorer.score([r.text for r in rollouts], [rows[r.group] for r in rollouts], contexts)
    scored = [
        replace(r, example=rows[r.group], reward=result.total[i],
                rewards={name: values[i] for name, values in result.per_function.items()})
        for i, r in enumerate(rollouts)
    ]
    return scored, result.metrics


def rollout_stage(engine, scorer: Scorer, tokenizer, cfg: RunConfig, seed: int, timing: dict):
    """`generate_and_score(rows) -> (scored rollouts, reward metrics)` for one step; each call is a
    new sampling round with its own seed, and adds its seconds to `timing`."""

    def generate_and_score(rows: list[dict]) -> tuple[list[Rollout], dict[str, float]]:
        tg = time.perf_counter()
        prompts, prompt_ids = encode_prompts(tokenizer, cfg.data, rows)
        sampling = sampling_params(cfg, seed=seed + 7_919 * timing["rounds"])
        timing["rounds"] += 1
        rollouts = engine.generate(prompt_ids, cfg.rollout.group_size, sampling)
        ts = time.perf_counter()
        scored = score_rollouts(scorer, rollouts, rows, prompts, cfg.rollout.max_new_tokens)
        timing["generate"] += ts - tg
        timing["score"] += time.perf_counter() - ts
        return scored

    return generate_and_score


def with_advantages(rollouts: list[Rollout], cfg: RunConfig) -> tuple[list[Rollout], dict[str, float]]:
    """Group advantages of the total reward plus DAPO's soft overlong penalty (when enabled; it is
    then added to each rollout's total and recorded under rewards["overlong_penalty"])."""
    G, max_tokens = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    lengths = torch.tensor([r.num_completion_tokens for r in rollouts])  # [P*G]
    penalty = overlong_penalty(lengths, max_tokens, round(cfg.algorithm.overlong_buffer * max_tokens))  # [P*G]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32) + penalty  # [P*G]
    rewards = rewards.view(-1, G)  # [P, G]
    adv = group_advantages(rewards, scale=cfg.algorithm.advantage_scale).flatten().tolist()  # [P*G]
    metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
               "reward/overlong_penalty": penalty.mean().item(),
               "train/zero_variance_groups": zero_variance_fraction(rewards)}
    if cfg.algorithm.overlong_buffer == 0:
        return [replace(r, advantage=a) for r, a in zip(rollouts, adv)], metrics
    return [replace(r, reward=float(t), advantage=a, rewards={**r.rewards, "overlong_penalty": float(p)})
            for r, t, a, p in zip(rollouts, rewards.flatten().tolist(), adv, penalty.tolist())], metrics


def rollout_metrics(rollouts: list[Rollout], max_new_tokens: int, seconds: float) -> dict[str, float]:
    lengths = [r.num_completion_tokens for r in rollouts]
    return {
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
    }


def rollout_rows(rollouts: list[Rollout], prompts: list[str], step: int, group_size: int) -> list[dict]:
    return [
        {"step": step, "group": r.group, "index": i % group_size, "prompt": prompts[r.group], "completion": r.text,
         "answer": str(r.example.get("answer", "")), "rewards": r.rewards, "reward": r.reward,
         "advantage": r.advantage, "finish_reason": r.finish_reason, "num_tokens": r.num_completion_tokens}
        for i, r in enumerate(rollouts)
    ]


# --- the loop -----------------------------------------------------------------------------------


def train(cfg: RunConfig, output_dir: str | Path) -> dict:
    """Run one training job; returns the summary (also written to summary.json)."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    started = time.perf_counter()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, P = cfg.rollout.group_size, cfg.trainer.prompts_per_step

    # --- set-up: rewards resolve before any model loads ---
    scorer = make_scorer(cfg)
    eval_scorer = make_eval_scorer(cfg)
    model, tokenizer = load_policy(cfg, device)
    # a frozen copy of the initial policy, only when the KL term needs it
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.algorithm.beta > 0 else None
    engine = make_engine(cfg, model, tokenizer, device)
    train_rows, eval_rows = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)
    eval_sets = load_eval_sets(cfg, eval_rows)
    prompts_sampler = PromptSampler(train_rows, seed=cfg.data.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, betas=cfg.trainer.betas,
                                  weight_decay=cfg.trainer.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.trainer.warmup_steps + 1)))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    tracker = make_tracker(output_dir, report_to=cfg.logging.report_to, project=cfg.logging.project,
                           run_name=cfg.logging.run_name or output_dir.name, config=cfg.model_dump(mode="json"))
    pad_id = tokenizer.pad_token_id
    summary: dict = {"output_dir": str(output_dir)}
    if cfg.eval.before_and_after and eval_rows:
        summary["eval_before"] = evaluate_greedy(engine, tokenizer, cfg, eval_rows, eval_scorer)

    format_history: list[float] = []
    bar = tqdm(range(1, cfg.trainer.steps + 1), desc="grpo", disable=not cfg.logging.progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # --- sample prompts, generate, score (DAPO dynamic sampling: repeat until groups differ) ---
        timing = {"generate": 0.0, "score": 0.0, "rounds": 0}
        generate_and_score = rollout_stage(engine, scorer, tokenizer, cfg, cfg.trainer.seed * 100_003 + step, timing)
        rows, rollouts, reward_metrics = sample_batch(generate_and_score, prompts_sampler.next_batch, P,
                                                      dynamic=cfg.algorithm.dynamic_sampling,
                                                      max_attempts=cfg.algorithm.max_sampling_attempts)
        prompts = encode_prompts(tokenizer, cfg.data, rows)[0]
        t1 = t0 + timing["generate"]
        t2 = time.perf_counter()
        # --- advantages ---
        rollouts, adv_metrics = with_advantages(rollouts, cfg)
        # --- update ---
        train_metrics = policy_update(model, optimizer, rollouts, cfg, pad_id, device, ref_model=ref_model)
        schedule.step()
        t3 = time.perf_counter()
        # --- sync weights to the engine ---
        engine.update_weights(model.named_parameters())
        t4 = time.perf_counter()
        # --- log ---
        accuracy = [r.rewards.get("math_answer") == 1.0 and r.rewards.get("format") == 1.0 for r in rollouts]
        metrics = {**reward_metrics, **adv_metrics, **train_metrics,
                   **rollout_metrics(rollouts, cfg.rollout.max_new_tokens, t1 - t0),
                   "rollout/accuracy": sum(accuracy) / len(accuracy), "train/lr": schedule.get_last_lr()[0],
                   "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
                   "time/weight_sync": t4 - t3, "time/step": t4 - t0}
        tracker.log(metrics, step)
        if "reward/format" in metrics:
            format_history.append(metrics["reward/format"])
        if step % cfg.logging.rollouts_every == 0 or step == cfg.trainer.steps:
            tracker.log_rollouts(rollout_rows(rollouts, prompts, step, G), step)
        if cfg.eval.every and step % cfg.eval.every == 0:
            evaluate_step(engine, tokenizer, cfg, eval_sets, eval_scorer, step, output_dir, tracker)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                        tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")

    # --- final evaluation, model, summary ---
    if cfg.eval.before_and_after and eval_rows:
        summary["eval_after"] = evaluate_greedy(engine, tokenizer, cfg, eval_rows, eval_scorer)
    tail = format_history[-max(1, math.ceil(len(format_history) / 10)) :]
    summary["train"] = {"steps": cfg.trainer.steps,
                        "format_reward_last": sum(tail) / len(tail) if tail else None,
                        "seconds": time.perf_counter() - started}
    model.save_pretrained(output_dir / "final")
    tokenizer.save_pretrained(output_dir / "final")
    tracker.close()
    scorer.close()
    eval_scorer.close()
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
