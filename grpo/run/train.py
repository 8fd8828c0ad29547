"""The GRPO training loop: sample prompts -> generate -> score -> advantages -> update -> sync -> log.

CPU (the tiny-cpu recipe: a tiny MoE pretrained locally, then RL only; a few minutes on 2 cores):
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
- Several optimizer steps per generation batch (`algorithm.mini_batches`, DeepSeek-R1's 16) take
  the learning-rate schedule through one optimizer step each: `trainer.steps` and
  `trainer.warmup_steps` count generation batches, the schedule optimizer steps.
- A step whose loss or gradient norm is not finite is skipped (not in any paper; a run stops
  after `trainer.max_consecutive_skips` in a row).
- DAPO dynamic sampling (`algorithm.dynamic_sampling`) runs in one process only for now: ranks
  could need different numbers of rounds and their prompt samplers would drift apart. Several
  processes with it on fail at start-up.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import grpo.run.step
from grpo import phases
from grpo.algo.moe import RouterControl
from grpo.algo.update import optimizer_steps_per_batch
from grpo.collectives import all_reduce_sum, broadcast_object, gather_objects, rank_slice
from grpo.config import ModelConfig, RunConfig, dump_config
from grpo.data.prompts import PromptSampler, correct_rewards
from grpo.data.sources import load_eval_sets, load_rows
from grpo.model.loading import load_policy, reference_model
from grpo.model.optim import make_optimizer, make_schedule
from grpo.run import checkpoint
from grpo.run.async_rollouts import IN_FLIGHT_FILE, AsyncRollouts, InFlight, effective_staleness, load_in_flight
from grpo.run.evaluate import evaluate_greedy, evaluate_step, make_eval_scorer
from grpo.run.processes import UnsupportedError, check_supported, fsdp_on_cpu, fully_shard_cpu, make_accelerator
from grpo.run.sampling import SamplingContext, engine_lengths, make_scorer, sampling_params
from grpo.run.step import (
    LearningContext,
    StepContext,
    StepResult,
    logs_rollouts,
    lora_sync,
    rollout_rows,
    sync_engine,
)
from grpo.run.tracking import make_tracker
from grpo.run.watchdog import Watchdog, timeline_path
from rewards import Scorer
from rollout import make_engine
from rollout.base import set_progress_hook


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class RewardFailure(RuntimeError):
    """A reward failed or timed out on every sample for `rewards.max_failing_steps` steps in a row."""


class AlreadyFinished(RuntimeError):
    """`--resume auto` on a run that already took all its steps: nothing to do, nothing rewritten."""


class Stopped(RuntimeError):
    """SIGTERM or SIGINT arrived: the run stopped after a whole step (`signum`: which signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """SIGTERM (a scheduler's notice before preemption) and SIGINT (Ctrl-C) ask the loop to stop
    after the step in progress; a second one stops at once. Every rank stops after the same step
    (the request is summed over processes each step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: no clean stop wanted
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> int | None:
        """The signal to stop for, agreed by every rank (None: go on)."""
        if all_reduce_sum(float(self.signum or 0)) == 0:
            return None
        return self.signum or signal.SIGTERM

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- set-up helpers (each one call deep from the loop) -----------------------------------------


def prepare_training(cfg: RunConfig, accelerator, model, tokenizer, lengths: dict[str, int] | None = None):
    """(trainer model, unwrapped model, optimizer, scheduler, engine) for this process layout.
    lengths: `make_engine`'s longest_prompt / max_new_tokens (`grpo.run.sampling.engine_lengths`).

    DDP (and one process): the engine decodes with the policy module itself. FSDP2: ranks decode
    different lengths, which sharded forwards cannot do, so the engine keeps a full copy that
    `sync_engine` refreshes after every update. Asynchronous RL: the trainer's engine is the
    transformers engine over the policy, for evaluations; rollouts come from the generation process.
    """
    sharded = fsdp_on_cpu(accelerator)
    engine_model = copy.deepcopy(model) if sharded or accelerator.is_fsdp2 else model
    if cfg.trainer.gradient_checkpointing:  # before wrapping; the engine's copy decodes without it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        model = fully_shard_cpu(model)
    optimizer = make_optimizer(model, cfg.trainer, fused=not (sharded or accelerator.is_fsdp2))
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    rollout = cfg.rollout.model_copy(update={"engine": "hf"}) if cfg.trainer.max_staleness else cfg.rollout
    engine = make_engine(rollout, engine_model, tokenizer, accelerator.device, seed=cfg.trainer.seed,
                         record_routing=cfg.moe.routing_replay == "R3", lora_rank=engine_lora_rank(cfg.model, rollout),
                         **(lengths or {}))
    if (sharded or accelerator.is_fsdp2) and cfg.model.lora is not None and getattr(engine, "model", None) is None \
            and not (cfg.model.lora.sync == "adapter" and getattr(engine, "takes_adapters", False)):
        engine.close()
        raise UnsupportedError("model.lora with FSDP2 pushes the adapter to vLLM, not merged weights (model.lora.sync="
                               f"{cfg.model.lora.sync}, or vLLM's CPU build with an MoE model): set model.lora.sync="
                               "adapter, use rollout.engine=hf, or run LoRA under DDP")
    schedule = make_schedule(optimizer, cfg.trainer, optimizer_steps_per_batch(cfg.algorithm))  # counts optimizer steps
    return model, accelerator.unwrap_model(model), optimizer, schedule, engine


def engine_lora_rank(model: ModelConfig, rollout) -> int | None:
    """The adapter rank a vLLM engine must take (LoRA runs that push adapters), else None."""
    lora = model.lora
    if lora is None or lora.sync != "adapter" or rollout.engine != "vllm":
        return None
    return lora.rank


class _NoTracker:
    """Ranks other than 0 log nothing."""

    def log(self, metrics, step): ...
    def log_rollouts(self, rows, step): ...
    def run_ids(self): return {}
    def close(self): ...


@dataclass
class Run:
    """One training job on this process: the step's context plus what the loop around it keeps."""

    cfg: RunConfig
    output_dir: Path
    accelerator: object
    ctx: StepContext
    state: checkpoint.TrainState
    resumed_from: Path | None
    tracker: object
    eval_scorer: Scorer
    eval_rows: list[dict]
    eval_sets: dict[str, list[dict]]
    in_flight: list[InFlight] = field(default_factory=list)  # batches a checkpoint saved (asynchronous RL)
    failing_steps: dict[str, int] = field(default_factory=dict)  # reward -> consecutive steps it failed everywhere
    format_history: list[float] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def check_restart(cfg: RunConfig, output_dir: Path, ckpt: Path | None, resume: str | None, allow: tuple[str, ...]) -> None:
    """Resume checks before anything loads: a finished run is not trained again, a run directory
    without a checkpoint is not overwritten, a checkpoint is not resumed under another recipe."""
    if resume == "auto" and (output_dir / "summary.json").is_file():
        done = checkpoint.load_state(ckpt).step if ckpt else None
        if done is None or done >= cfg.trainer.steps:
            raise AlreadyFinished(f"{output_dir} already finished (summary.json); nothing to resume. To train on, raise "
                                  "trainer.steps above its last checkpoint's step, or start a new run in another directory")
    if resume == "auto" and ckpt is None and (output_dir / "metrics.jsonl").is_file():
        logged = sum(1 for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
        if logged:
            raise checkpoint.ResumeError(f"{output_dir}: holds a run ({logged} steps in metrics.jsonl) but no checkpoint to "
                                         "resume from (trainer.save_every was 0?); start a new run in another directory")
    if ckpt:
        checkpoint.check_resume(ckpt, cfg.model_dump(mode="json"), allow)


def set_up(cfg: RunConfig, output_dir: str | Path, resume: str | None, allow_changes: tuple[str, ...] = ()) -> Run:
    """Processes, rewards (resolved before any model loads), models, data, engine (sized for the data) and tracker."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    # every rank takes a contiguous share of the global batch of prompts
    accelerator = make_accelerator(cfg.trainer.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    check_supported(cfg, world)  # dynamic sampling, asynchronous RL: one process only
    staleness = effective_staleness(cfg, accelerator.device)
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_staleness": staleness})})
    output_dir = Path(broadcast_object(str(output_dir)))
    ckpt = broadcast_object(checkpoint.resolve_resume(resume, output_dir))
    check_restart(cfg, output_dir, ckpt, resume, allow_changes)
    state = checkpoint.load_state(ckpt) if ckpt else checkpoint.TrainState()
    in_flight = _saved_in_flight(ckpt, staleness) if ckpt else []
    scorer, eval_scorer = make_scorer(cfg), make_eval_scorer(cfg)
    model, tokenizer = load_policy(cfg.model, accelerator.device, path=ckpt / "model" if ckpt else None,
                                   progress=cfg.logging.progress, seed=cfg.trainer.seed)
    ref_model = reference_model(cfg, model, accelerator.device, resumed=bool(ckpt))  # before router hooks
    if ckpt:
        checkpoint.restore_reference(ckpt, ref_model)  # the refreshed reference (algorithm.ref_refresh_steps)
    moe = RouterControl(model, cfg.moe)
    train_rows, eval_rows = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)
    eval_sets = load_eval_sets(cfg, eval_rows)  # the engine's context holds the longest prompt of all
    lengths = engine_lengths(cfg, tokenizer, train_rows, *eval_sets.values()) if not cfg.trainer.max_staleness else {}
    model, unwrapped, optimizer, schedule, engine = prepare_training(cfg, accelerator, model, tokenizer, lengths)
    if ckpt:
        checkpoint.restore(ckpt, model=model, optimizer=optimizer, scheduler=schedule, rank=rank)
    sync_engine(engine, model, unwrapped, lora_sync(cfg.model))  # an engine with its own weights starts from exactly the policy
    prompts = PromptSampler(train_rows, seed=cfg.data.seed, epoch=state.sampler_epoch, position=state.sampler_position)
    record_routing = moe.is_moe and cfg.moe.routing_replay == "R3"
    sampling = SamplingContext(cfg, engine, scorer, tokenizer, prompts,
                               batch=rank_slice(cfg.trainer.prompts_per_step, rank, world),
                               sampling=sampling_params(cfg.rollout, record_routing=record_routing),
                               hide=(str(output_dir),))  # the python tool's sandbox never sees the run directory
    learning = LearningContext(cfg, engine, tokenizer, model, unwrapped, optimizer, schedule, accelerator.device, moe,
                               ref_model=ref_model)
    ctx = StepContext(sampling, learning)
    tracker = _open_tracker(cfg, output_dir, state, ckpt) if accelerator.is_main_process else _NoTracker()
    return Run(cfg, output_dir, accelerator, ctx, state, ckpt, tracker, eval_scorer, eval_rows, eval_sets, in_flight)


def _saved_in_flight(ckpt: Path, staleness: int) -> list[InFlight]:
    """The batches an asynchronous run's checkpoint holds; refused when this run's staleness cannot
    take them (they were sampled up to that many versions back)."""
    saved = load_in_flight(ckpt / IN_FLIGHT_FILE)
    if len(saved) > staleness:
        raise UnsupportedError(f"{ckpt}: the checkpoint holds {len(saved)} batches sampled ahead by an asynchronous "
                               f"run; resume it with trainer.max_staleness={len(saved)} or more (this run: {staleness})")
    return saved


def _open_tracker(cfg: RunConfig, output_dir: Path, state: checkpoint.TrainState, ckpt: Path | None):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if ckpt:
        checkpoint.trim_metrics(output_dir, state.step)
    return make_tracker(output_dir, report_to=cfg.logging.report_to, project=cfg.logging.project,
                        run_name=cfg.logging.run_name or output_dir.name, config=cfg.model_dump(mode="json"),
                        resume_ids=state.tracker_ids)


# --- around each step: logging, evaluation, checkpoints ----------------------------------------


def log_step(run: Run, result: StepResult, bar) -> None:
    """Metrics (every step), rollouts (every `logging.rollouts_every`), evaluation (`eval.every`)."""
    cfg, step = run.cfg, result.step
    metrics = {**result.metrics, "train/skipped_steps": run.state.skipped_steps}
    run.tracker.log(metrics, step)
    if "reward/format" in metrics:
        run.format_history.append(metrics["reward/format"])
    if logs_rollouts(cfg, step):
        tools = cfg.rollout.tools
        code = (tools.code_open, tools.code_close) if tools.environment == "python" else None
        shares = gather_objects(rollout_rows(result, cfg.rollout.group_size, run.ctx.learning.tokenizer, code))
        run.tracker.log_rollouts([row for share in shares for row in share], step)
    if cfg.eval.every and step % cfg.eval.every == 0 and run.is_main:
        c = run.ctx.learning
        with phases.phase("evaluate"):
            evaluate_step(c.engine, c.tokenizer, cfg, run.eval_sets, run.eval_scorer, step, run.output_dir, run.tracker,
                          environment=run.ctx.sampling.environment)
    bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                    tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")


def count_skip(run: Run, result: StepResult) -> None:
    state = run.state
    state.consecutive_skips = state.consecutive_skips + 1 if result.skipped else 0
    state.skipped_steps += int(result.skipped)


def stop_if_rewards_fail(run: Run, result: StepResult) -> None:
    """A reward that failed (raised, returned a non-number, timed out) on every sample of
    `rewards.max_failing_steps` consecutive steps stops the run: its scores are only the error score."""
    cfg, limit = run.cfg, run.cfg.rewards.max_failing_steps
    if not limit:
        return
    samples = len(range(cfg.trainer.prompts_per_step)[run.ctx.sampling.batch]) * cfg.rollout.group_size  # this rank's first round
    for spec in run.ctx.sampling.scorer.specs:
        m = result.metrics
        failed = m.get(f"reward/{spec.name}/errors", 0.0) + m.get(f"reward/{spec.name}/timeouts", 0.0)
        run.failing_steps[spec.name] = run.failing_steps.get(spec.name, 0) + 1 if failed >= samples else 0
        if run.failing_steps[spec.name] >= limit:
            run.tracker.close()
            raise RewardFailure(f"step {result.step}: reward {spec.name!r} failed or timed out on every sample for {limit} "
                                "consecutive steps (its log lines above say why); fix it, or set "
                                f"rewards.max_failing_steps=0 to go on. Last checkpoint: "
                                f"{checkpoint.latest(run.output_dir) or 'none'}")


def stop_if_not_finite(run: Run, step: int) -> None:
    """Too many skipped (non-finite) steps in a row stop the run."""
    state, limit = run.state, run.cfg.trainer.max_consecutive_skips
    if state.consecutive_skips >= limit:
        run.tracker.close()
        raise NonFiniteError(f"step {step}: {state.consecutive_skips} consecutive steps had a non-finite loss "
                             f"or gradient norm (trainer.max_consecutive_skips={limit}); stopping. "
                             f"Last checkpoint: {checkpoint.latest(run.output_dir) or 'none'}")


def save_if_due(run: Run, step: int, source: AsyncRollouts | None = None, now: bool = False) -> Path | None:
    """A checkpoint every `trainer.save_every` steps and after the last one (`now`: whatever the
    step, if checkpoints are on). Asynchronous RL: with the batches already sampled for the next
    steps, and the prompt sampler's state after them."""
    cfg, state, c, prompts = run.cfg, run.state, run.ctx.learning, run.ctx.sampling.prompts
    if not cfg.trainer.save_every or not (now or step % cfg.trainer.save_every == 0 or step == cfg.trainer.steps):
        return None
    state.step, state.sampler_epoch, state.sampler_position = step, prompts.epoch, prompts.position
    extra = {}
    if c.ref_model is not None and cfg.algorithm.ref_refresh_steps and step >= cfg.algorithm.ref_refresh_steps:
        extra[checkpoint.REFERENCE_FILE] = checkpoint.module_state(c.ref_model)  # no longer the recipe's model
    in_flight = None
    if source is not None:
        in_flight, sampler = source.in_flight(step)
        if sampler is not None:
            state.sampler_epoch, state.sampler_position = sampler
    state.tracker_ids = run.tracker.run_ids() if run.is_main else None
    with phases.phase("checkpoint"):
        return checkpoint.save(run.output_dir, state, model=c.model, unwrapped=c.unwrapped, tokenizer=c.tokenizer,
                               optimizer=c.optimizer, scheduler=c.schedule, keep_last=cfg.trainer.keep_checkpoints,
                               is_main=run.is_main,
                               extra={**extra, **({IN_FLIGHT_FILE: in_flight} if in_flight else {})},
                               config=cfg.model_dump(mode="json"))


def stop(run: Run, step: int, signum: int, source: AsyncRollouts | None) -> Stopped:
    """The way out after SIGTERM / SIGINT: a checkpoint of `step` (when checkpoints are on), the
    reward workers and the engine closed, and the one line that says so."""
    saved = save_if_due(run, step, source, now=True)
    run.tracker.close()
    run.ctx.sampling.scorer.close()
    run.ctx.sampling.close_environment()
    run.eval_scorer.close()
    run.ctx.learning.engine.close()
    name = signal.Signals(signum).name
    where = (f"checkpoint {saved}; continue with --resume auto" if saved else
             "no checkpoint written (trainer.save_every is 0)")
    return Stopped(f"{name} received: stopped after step {step} of {run.cfg.trainer.steps}; {where}", signum)


def finish(run: Run, summary: dict, started: float) -> None:
    """Final evaluation, the final model and the summary (rank 0 writes), then close everything."""
    cfg, c = run.cfg, run.ctx.learning
    with phases.phase("checkpoint"):
        weights = checkpoint.policy_state(c.model)
    if run.is_main:
        if cfg.eval.before_and_after and run.eval_rows:
            with phases.phase("evaluate"):
                summary["eval_after"] = evaluate_greedy(c.engine, c.tokenizer, cfg, run.eval_rows, run.eval_scorer,
                                                        run.ctx.sampling.environment)
        tail = run.format_history[-max(1, math.ceil(len(run.format_history) / 10)) :]
        summary["train"] = {"steps": cfg.trainer.steps, "processes": run.accelerator.num_processes,
                            "skipped_steps": run.state.skipped_steps,
                            "format_reward_last": sum(tail) / len(tail) if tail else None,
                            "seconds": time.perf_counter() - started}
        summary["thinking"] = thinking_summary(run.output_dir / "metrics.jsonl")
        summary["correct"] = correct_rewards(cfg.data, cfg.eval)  # the rewards that define "correct"
        with phases.phase("checkpoint"):
            checkpoint.save_final(run.output_dir, c.unwrapped, c.tokenizer, weights)
            checkpoint.write_atomic(run.output_dir / "summary.json", json.dumps(summary, indent=2))
    run.tracker.close()
    run.ctx.sampling.scorer.close()
    run.ctx.sampling.close_environment()
    run.eval_scorer.close()
    c.engine.close()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Join the process group's threads now: left to interpreter exit, a rank sometimes aborted
        # ("terminate called without an active exception") after the run had finished.
        torch.distributed.destroy_process_group()


def thinking_summary(metrics_path: Path) -> dict | None:
    """Tokens written inside the thinking block and the share of completions with consistent steps,
    each as the mean over the first and over the last 10% of steps (read from metrics.jsonl, so a
    resumed run counts every step)."""
    rows = []
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "rollout/think_tokens_mean" in row:
                rows.append(row)
    if not rows:
        return None
    k = max(1, math.ceil(len(rows) / 10))
    return {f"{name}_{end}_10pct": sum(r[key] for r in part) / len(part)
            for name, key in (("think_tokens", "rollout/think_tokens_mean"), ("consistent", "rollout/think_consistent"))
            for end, part in (("first", rows[:k]), ("last", rows[-k:]))}


@contextlib.contextmanager
def rollout_source(run: Run):
    """The generation process of an asynchronous run (`trainer.max_staleness` >= 1), else None."""
    if not run.cfg.trainer.max_staleness:
        yield None
        return
    resumed, state = run.resumed_from, run.state
    with AsyncRollouts(run.cfg, output_dir=run.output_dir, staleness=run.cfg.trainer.max_staleness,
                       start_step=state.step + 1,
                       model_path=str(resumed / "model") if resumed else None, saved=run.in_flight,
                       sampler_epoch=state.sampler_epoch, sampler_position=state.sampler_position,
                       model=run.ctx.learning.model) as source:
        yield source


@contextlib.contextmanager
def watched(run: Run):
    """The watchdog of this process (`grpo.run.watchdog`), with the engines' progress as its beats, and
    its phase timeline (`grpo.phases.record_to`)."""
    t, rank = run.cfg.trainer, run.accelerator.process_index
    with Watchdog(run.output_dir, warn_s=t.stall_warn_s, stop_s=t.stall_stop_s, rank=rank,
                  world=run.accelerator.num_processes):
        set_progress_hook(phases.beat)
        phases.record_to(timeline_path(run.output_dir, "trainer", rank), "trainer", rank)  # the dashboard's timeline
        try:
            yield
        finally:
            set_progress_hook(None)
            phases.record_to(None)


# --- the loop -----------------------------------------------------------------------------------


def train(cfg: RunConfig, output_dir: str | Path, resume: str | None = None, allow_changes: tuple[str, ...] = ()) -> dict:
    """Run one training job on this process (one of several under accelerate); returns the
    summary (rank 0 also writes it to summary.json). `resume`: None, "auto" or a checkpoint path;
    `allow_changes`: recipe keys a resumed run may change besides `checkpoint.SAFE_TO_CHANGE`."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = set_up(cfg, output_dir, resume, allow_changes)
    cfg, c, first = run.cfg, run.ctx.learning, run.state.step + 1
    summary: dict = {"output_dir": str(run.output_dir), "resumed_from": str(run.resumed_from) if run.resumed_from else None}
    # asynchronous RL: the generation process starts first, so its start-up overlaps the evaluation
    with watched(run):
        with StopSignals() as signals, rollout_source(run) as source:  # source None: synchronous
            if cfg.eval.before_and_after and run.eval_rows and run.is_main and not run.resumed_from:
                with phases.phase("evaluate"):
                    summary["eval_before"] = evaluate_greedy(c.engine, c.tokenizer, cfg, run.eval_rows,
                                                             run.eval_scorer, run.ctx.sampling.environment)
            bar = tqdm(range(first, cfg.trainer.steps + 1), desc="grpo", dynamic_ncols=True,
                       disable=not (cfg.logging.progress and run.is_main), initial=first - 1, total=cfg.trainer.steps)
            for step in bar:
                phases.set_step(step)
                # --- generate, score, advantages, update, weight sync (grpo/run/step.py) ---
                if source is None:
                    result = grpo.run.step.run_step(run.ctx, step)
                else:  # this step's batch was sampled ahead, while earlier steps trained
                    with phases.phase("wait for batch"):
                        batch = source.take(step)
                    result = grpo.run.step.learn(c, step, batch)
                    with phases.phase("push weights"):
                        source.publish(step, c.model)
                # --- skipped-step accounting, logging, evaluation, checkpoint ---
                count_skip(run, result)
                log_step(run, result, bar)
                stop_if_not_finite(run, step)
                stop_if_rewards_fail(run, result)
                save_if_due(run, step, source)
                signum = signals.requested()
                if signum is not None and step < cfg.trainer.steps:
                    raise stop(run, step, signum, source)

        # --- final evaluation, model, summary ---
        finish(run, summary, started)
    return summary
