"""The GRPO training loop: sample prompts -> generate -> score -> advantages -> update -> sync -> log.

CPU (the embedded default: a tiny MoE pretrained locally, then RL only; a few minutes on 2 cores):
    grpo train recipes/tiny-cpu.yaml
    grpo train recipes/tiny-cpu.yaml --accelerate-config cpu-2proc       # 2 processes, gloo
GPU cluster (see recipes/ for real-model recipes, recipes/accelerate/ for launcher configs):
    grpo train recipes/<recipe>.yaml --output-dir runs/x --accelerate-config fsdp2
    accelerate launch --config_file recipes/accelerate/multi-node-fsdp2.yaml \
        --machine_rank R --main_process_ip HOST -m grpo train recipes/<recipe>.yaml --output-dir runs/x
Resume after a crash: the same command with `--resume auto`.

Where this departs from the papers, on purpose:
- The default loss aggregation is DAPO's token mean over the global batch (2503.14476), not
  GRPO's per-sequence mean (2402.03300): long completions are not down-weighted per token.
- No KL penalty by default (beta = 0), as in DAPO and Dr. GRPO: R1-Zero-style runs start from a
  base model and the reference anchor mostly slows learning.
- One optimisation pass per batch by default (num_iterations = 1), so the clipped ratio is 1 and
  the update is REINFORCE with a group baseline; more passes use old log-probs computed once.
- A step whose loss or gradient norm is not finite is skipped (not in any paper; a run stops
  after `trainer.max_consecutive_skips` in a row).
- DAPO dynamic sampling (`algorithm.dynamic_sampling`) runs in one process only for now: ranks
  could need different numbers of rounds and their prompt samplers would drift apart. Several
  processes with it on fail at start-up.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from grpo import checkpoint
from grpo.advantages import group_advantages, overlong_penalty, zero_variance_fraction
from grpo.config import RunConfig, dump_config
from grpo.data import PromptSampler, load_eval_sets, load_rows, render_prompts
from grpo.distributed import (
    all_reduce_tensor,
    broadcast_object,
    check_supported,
    fsdp_on_cpu,
    fully_shard_cpu,
    gather_objects,
    group_seed,
    make_accelerator,
    rank_slice,
    reduce_metrics,
)
from grpo.evaluate import evaluate_greedy, evaluate_step, make_eval_scorer
from grpo.experts import experts_implementation
from grpo.moe import RouterControl, load_metrics
from grpo.sampling import sample_batch
from grpo.tracking import make_tracker
from grpo.update import policy_update
from rewards import RewardSpec, Scorer
from rollout import make_engine
from rollout.base import Rollout, SamplingParams

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


# --- set-up helpers (each one call deep from the loop) -----------------------------------------


def load_policy(cfg: RunConfig, device: torch.device, path: str | Path | None = None):
    """The policy and its tokenizer: a built-in tiny base (built and cached on first use), a Hub
    id or a local directory; `path` (a checkpoint's model) replaces the recipe's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.tiny import BUILTIN_PREFIX, ensure_tiny_base

    name = str(path) if path is not None else cfg.model.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        name = str(ensure_tiny_base(name[len(BUILTIN_PREFIX) :], progress=cfg.logging.progress))
    kwargs = {"dtype": getattr(torch, cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision and path is None:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    experts = experts_implementation(cfg.model.experts_implementation, device)
    if experts:
        kwargs["experts_implementation"] = experts
    revision = cfg.model.revision if path is None else None
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs).to(device)
    return model, tokenizer


def reference_model(cfg: RunConfig, model, device: torch.device, resumed: bool):
    """The frozen initial policy for the KL term (beta > 0 only; None otherwise). A resumed run
    reloads the recipe's model: the checkpoint holds the trained policy, not the reference."""
    if cfg.algorithm.beta <= 0:
        return None
    ref = load_policy(cfg, device)[0] if resumed else copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def make_scorer(cfg: RunConfig) -> Scorer:
    r = cfg.rewards
    specs = [RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in r.functions]
    return Scorer(specs, workers=r.workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb,
                  timeout_score=r.timeout_score, error_score=r.error_score, fail_fast=r.fail_fast)


def make_optimizer(model, tr, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the model's parameters; the fused kernel (one pass over all parameters) where
    torch has one for their device and dtype, unless `fused` is False (sharded DTensor params)."""
    params = list(model.parameters())
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.float16,
                                                                              torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay, fused=fused or None)


def prepare_training(cfg: RunConfig, accelerator, model, tokenizer):
    """(trainer model, unwrapped model, optimizer, scheduler, engine) for this process layout.

    DDP (and one process): the engine decodes with the policy module itself. FSDP2: ranks decode
    different lengths, which sharded forwards cannot do, so the engine keeps a full copy that
    `sync_engine` refreshes after every update.
    """
    sharded = fsdp_on_cpu(accelerator)
    engine_model = copy.deepcopy(model) if sharded or accelerator.is_fsdp2 else model
    tr = cfg.trainer
    if sharded:
        model = fully_shard_cpu(model)
    optimizer = make_optimizer(model, tr, fused=not (sharded or accelerator.is_fsdp2))
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (tr.warmup_steps + 1)))
    engine = make_engine(cfg, engine_model, tokenizer, accelerator.device,
                         record_routing=cfg.moe.routing_replay == "R3", seed=cfg.trainer.seed)
    return model, accelerator.unwrap_model(model), optimizer, schedule, engine


def engine_phase(engine, phase: str) -> None:
    """Tell the engine the training phase starts (`before_update`: colocated vLLM sleeps) or ended
    (`after_update`); engines without memory phases (the HF engine) have neither hook."""
    hook = getattr(engine, phase, None)
    if callable(hook):
        hook()


def sync_engine(engine, model, unwrapped) -> None:
    engine_model = getattr(engine, "model", None)  # the HF engine decodes with a module; vLLM has its own
    if engine_model is unwrapped:  # colocated, same tensors: nothing to copy
        return
    full = checkpoint.full_model_state(model, every_rank=True)  # a collective under FSDP2
    if engine_model is not None:
        own = dict(engine_model.named_parameters())
        full = {k: v for k, v in full.items() if k in own}
    engine.update_weights(full.items())


class _NoTracker:
    """Ranks other than 0 log nothing."""

    def log(self, metrics, step): ...
    def log_rollouts(self, rows, step): ...
    def run_ids(self): return {}
    def close(self): ...


def sampling_params(cfg: RunConfig, prompt_seeds: list[int], record_routing: bool = False) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                          top_k=ro.top_k, stop=tuple(ro.stop), prompt_seeds=tuple(prompt_seeds),
                          record_routing=record_routing)


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


def rollout_stage(engine, scorer: Scorer, tokenizer, cfg: RunConfig, step: int, first_index: int, timing: dict,
                  record_routing: bool = False):
    """`generate_and_score(rows) -> (scored rollouts, reward metrics)` for one step; each call is a
    new sampling round and adds its seconds to `timing`. Group i of round r samples with
    `group_seed(seed, step, first_index + i, r)`: `first_index` is this rank's first global prompt
    index, so a group samples the same completions whichever rank (and however many) sample it."""

    def generate_and_score(rows: list[dict]) -> tuple[list[Rollout], dict[str, float]]:
        tg = time.perf_counter()
        prompts, prompt_ids = encode_prompts(tokenizer, cfg.data, rows)
        seeds = [group_seed(cfg.trainer.seed, step, first_index + i, timing["rounds"]) for i in range(len(rows))]
        timing["rounds"] += 1
        rollouts = engine.generate(prompt_ids, cfg.rollout.group_size, sampling_params(cfg, seeds, record_routing))
        ts = time.perf_counter()
        scored = score_rollouts(scorer, rollouts, rows, prompts, cfg.rollout.max_new_tokens)
        timing["generate"] += ts - tg
        timing["score"] += time.perf_counter() - ts
        return scored

    return generate_and_score


def with_advantages(rollouts: list[Rollout], cfg: RunConfig) -> tuple[list[Rollout], dict[str, float]]:
    """Group advantages of the total reward plus DAPO's soft overlong penalty (when enabled; it is
    then added to each rollout's total and recorded under rewards["overlong_penalty"]).

    Computed on the global [P, G] reward tensor (gathered from every rank), so any scaling,
    batch-level std included, is the same as in one process; this rank keeps its rows."""
    G, max_tokens = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    lengths = torch.tensor([r.num_completion_tokens for r in rollouts])  # [P/W*G]
    penalty = overlong_penalty(lengths, max_tokens, round(cfg.algorithm.overlong_buffer * max_tokens))  # [P/W*G]
    local = (torch.tensor([r.reward for r in rollouts], dtype=torch.float32) + penalty).view(-1, G)  # [P/W, G]
    shares = gather_objects((local, penalty))
    rank = _rank() if len(shares) > 1 else 0
    rewards = torch.cat([s[0] for s in shares])  # [P, G]
    start = sum(len(s[0]) for s in shares[:rank])
    adv = group_advantages(rewards, scale=cfg.algorithm.advantage_scale)[start : start + len(local)].flatten().tolist()
    metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
               "reward/overlong_penalty": torch.cat([s[1] for s in shares]).mean().item(),
               "train/zero_variance_groups": zero_variance_fraction(rewards)}
    if cfg.algorithm.overlong_buffer == 0:
        return [replace(r, advantage=a) for r, a in zip(rollouts, adv)], metrics
    return [replace(r, reward=float(t), advantage=a, rewards={**r.rewards, "overlong_penalty": float(p)})
            for r, t, a, p in zip(rollouts, local.flatten().tolist(), adv, penalty.tolist())], metrics


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def rollout_metrics(rollouts: list[Rollout], max_new_tokens: int, seconds: float) -> dict[str, float]:
    lengths = [r.num_completion_tokens for r in rollouts]
    return {
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
    }


def rollout_rows(rollouts: list[Rollout], prompts: list[str], step: int, group_size: int,
                 first_group: int = 0) -> list[dict]:
    """Rows for the tracker; `group` is the global prompt index (this rank's first is `first_group`)."""
    return [
        {"step": step, "group": first_group + r.group, "index": i % group_size, "prompt": prompts[r.group], "completion": r.text,
         "answer": str(r.example.get("answer", "")), "rewards": r.rewards, "reward": r.reward,
         "advantage": r.advantage, "finish_reason": r.finish_reason, "num_tokens": r.num_completion_tokens}
        for i, r in enumerate(rollouts)
    ]


# --- the loop -----------------------------------------------------------------------------------


def train(cfg: RunConfig, output_dir: str | Path, resume: str | None = None) -> dict:
    """Run one training job on this process (one of several under accelerate); returns the
    summary (rank 0 also writes it to summary.json). `resume`: None, "auto" or a checkpoint path."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    # --- processes: every rank takes a contiguous share of the global batch of prompts ---
    accelerator = make_accelerator(cfg.trainer.seed)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    check_supported(cfg, world)  # dynamic sampling: one process only
    output_dir = Path(broadcast_object(str(output_dir)))
    G, P = cfg.rollout.group_size, cfg.trainer.prompts_per_step
    mine = rank_slice(P, rank, world)
    ckpt = broadcast_object(checkpoint.resolve_resume(resume, output_dir))
    state = checkpoint.load_state(ckpt) if ckpt else checkpoint.TrainState()

    # --- set-up: rewards resolve before any model loads ---
    scorer = make_scorer(cfg)
    eval_scorer = make_eval_scorer(cfg)
    model, tokenizer = load_policy(cfg, accelerator.device, path=ckpt / "model" if ckpt else None)
    ref_model = reference_model(cfg, model, accelerator.device, resumed=bool(ckpt))  # before router hooks
    moe = RouterControl(model, cfg.moe)
    model, unwrapped, optimizer, schedule, engine = prepare_training(cfg, accelerator, model, tokenizer)
    if ckpt:
        checkpoint.restore(ckpt, model=model, optimizer=optimizer, scheduler=schedule, rank=rank)
    sync_engine(engine, model, unwrapped)  # an engine with its own weights starts from exactly the policy
    train_rows, eval_rows = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)
    eval_sets = load_eval_sets(cfg, eval_rows)
    prompts_sampler = PromptSampler(train_rows, seed=cfg.data.seed, epoch=state.sampler_epoch,
                                    position=state.sampler_position)
    tracker = _NoTracker()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if ckpt:
            checkpoint.trim_metrics(output_dir, state.step)
        tracker = make_tracker(output_dir, report_to=cfg.logging.report_to, project=cfg.logging.project,
                               run_name=cfg.logging.run_name or output_dir.name, config=cfg.model_dump(mode="json"),
                               resume_ids=state.tracker_ids)
    pad_id = tokenizer.pad_token_id
    record_routing = moe.is_moe and cfg.moe.routing_replay == "R3"
    summary: dict = {"output_dir": str(output_dir), "resumed_from": str(ckpt) if ckpt else None}
    if cfg.eval.before_and_after and eval_rows and is_main and not ckpt:
        summary["eval_before"] = evaluate_greedy(engine, tokenizer, cfg, eval_rows, eval_scorer)

    format_history: list[float] = []
    bar = tqdm(range(state.step + 1, cfg.trainer.steps + 1), desc="grpo", dynamic_ncols=True,
               disable=not (cfg.logging.progress and is_main), initial=state.step, total=cfg.trainer.steps)
    for step in bar:
        t0 = time.perf_counter()
        # --- sample prompts, generate, score: the same global batch everywhere, this rank keeps
        #     its groups (slicing is a no-op in one process, the only layout with dynamic sampling) ---
        timing = {"generate": 0.0, "score": 0.0, "rounds": 0}
        generate_and_score = rollout_stage(engine, scorer, tokenizer, cfg, step, mine.start, timing, record_routing)
        rows, rollouts, reward_metrics = sample_batch(generate_and_score, lambda n: prompts_sampler.next_batch(n)[mine],
                                                      P, dynamic=cfg.algorithm.dynamic_sampling,
                                                      max_attempts=cfg.algorithm.max_sampling_attempts)
        prompts = encode_prompts(tokenizer, cfg.data, rows)[0]
        t2 = time.perf_counter()
        # --- advantages (over the global batch) ---
        rollouts, adv_metrics = with_advantages(rollouts, cfg)
        # --- update (skipped when the loss or gradient norm is not finite) ---
        engine_phase(engine, "before_update")
        train_metrics = policy_update(model, optimizer, rollouts, cfg, pad_id, accelerator.device,
                                      ref_model=ref_model, moe=moe)
        skipped = train_metrics.pop("train/skipped") > 0
        state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
        state.skipped_steps += int(skipped)
        if not skipped:
            schedule.step()
        t3 = time.perf_counter()
        # --- sync weights to the engine ---
        sync_engine(engine, model, unwrapped)
        engine_phase(engine, "after_update")
        t4 = time.perf_counter()
        # --- log: metrics averaged over ranks, expert loads summed ---
        accuracy = [r.rewards.get("math_answer") == 1.0 and r.rewards.get("format") == 1.0 for r in rollouts]
        metrics = reduce_metrics({**reward_metrics, **train_metrics,
                                  **rollout_metrics(rollouts, cfg.rollout.max_new_tokens, timing["generate"]),
                                  "rollout/accuracy": sum(accuracy) / len(accuracy), "time/generate": timing["generate"],
                                  "time/score": timing["score"], "time/train": t3 - t2, "time/weight_sync": t4 - t3,
                                  "time/step": t4 - t0})
        metrics.update(adv_metrics, **{"train/lr": schedule.get_last_lr()[0], "train/skipped_steps": state.skipped_steps})
        counts = moe.take_counts()
        if counts is not None:
            metrics.update(load_metrics(all_reduce_tensor(counts)))
        tracker.log(metrics, step)
        if "reward/format" in metrics:
            format_history.append(metrics["reward/format"])
        if step % cfg.logging.rollouts_every == 0 or step == cfg.trainer.steps:
            shares = gather_objects(rollout_rows(rollouts, prompts, step, G, first_group=mine.start))
            tracker.log_rollouts([row for share in shares for row in share], step)
        if cfg.eval.every and step % cfg.eval.every == 0 and is_main:
            evaluate_step(engine, tokenizer, cfg, eval_sets, eval_scorer, step, output_dir, tracker)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                        tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")
        if state.consecutive_skips >= cfg.trainer.max_consecutive_skips:
            tracker.close()
            raise NonFiniteError(f"step {step}: {state.consecutive_skips} consecutive steps had a non-finite loss or "
                                 f"gradient norm (trainer.max_consecutive_skips={cfg.trainer.max_consecutive_skips}); "
                                 f"stopping. Last checkpoint: {checkpoint.latest(output_dir) or 'none'}")
        # --- checkpoint ---
        if cfg.trainer.save_every and (step % cfg.trainer.save_every == 0 or step == cfg.trainer.steps):
            state.step, state.sampler_epoch, state.sampler_position = step, prompts_sampler.epoch, prompts_sampler.position
            state.tracker_ids = tracker.run_ids() if is_main else None
            checkpoint.save(output_dir, state, model=model, unwrapped=unwrapped, tokenizer=tokenizer, optimizer=optimizer,
                            scheduler=schedule, keep_last=cfg.trainer.keep_checkpoints, is_main=is_main)

    # --- final evaluation, model, summary (rank 0 writes) ---
    weights = checkpoint.full_model_state(model)
    if is_main:
        if cfg.eval.before_and_after and eval_rows:
            summary["eval_after"] = evaluate_greedy(engine, tokenizer, cfg, eval_rows, eval_scorer)
        tail = format_history[-max(1, math.ceil(len(format_history) / 10)) :]
        summary["train"] = {"steps": cfg.trainer.steps, "processes": world, "skipped_steps": state.skipped_steps,
                            "format_reward_last": sum(tail) / len(tail) if tail else None,
                            "seconds": time.perf_counter() - started}
        unwrapped.save_pretrained(output_dir / "final", state_dict=weights)
        tokenizer.save_pretrained(output_dir / "final")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tracker.close()
    scorer.close()
    eval_scorer.close()
    engine.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Join the process group's threads now: left to interpreter exit, a rank sometimes aborted
        # ("terminate called without an active exception") after the run had finished.
        torch.distributed.destroy_process_group()
    return summary
