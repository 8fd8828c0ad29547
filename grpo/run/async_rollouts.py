"""Asynchronous RL: a generation process samples later steps while the trainer updates.

With `trainer.max_staleness` k >= 1 the batch of step s is sampled by the policy after step
max(v0, s - 1 - k) (v0: the step the run started or resumed from), in a separate process with its
own share of the cores (`trainer.generation_threads`):

    trainer   ... learn(s-1) ─ publish v=s-1 ─ learn(s) ─ publish v=s ─ ...
    generator ... collect(s+k) with v=s-1   ─   collect(s+k+1) with v=s ─ ...

Admission bounds the staleness: the generator starts step s only once the weights of step
s - 1 - k have been published (it waits; nothing finished is ever discarded, groups stay whole).
The lag is exactly k once the pipeline is full, whatever the timing, so a run is deterministic:
the same recipe samples the same rollouts, and a resumed run continues the same sequence.
Every rollout records the version (`Rollout.policy_version`); the loss treats the batch as
off-policy (the decoupled objective, grpo/algo/loss.py).

Engines: the transformers engine on CPU (the process keeps its own copy of the policy and loads
each published version), and vLLM in server mode (the process drives the server over HTTP and
pushes each version to it). Colocated vLLM shares the device with the trainer and stays
synchronous (k = 0, with a warning); so does the transformers engine on a GPU.

Checkpoints: a checkpoint after step S holds the batches S+1 .. S+k already sampled (they were
sampled by weights that no longer exist), and the prompt sampler's position after them; the
resumed run trains on those first and the new generation process continues from S+k+1 with the
weights of step S. The batches it had sampled beyond S+k are regenerated, identically.

Failures: an exception in the generation process reaches the trainer as a `GenerationError`
carrying its message within a fraction of a second; a generation process that dies without one
is reported with its exit status. The generation process dies with the trainer (PR_SET_PDEATHSIG).
It has its own watchdog (grpo/run/watchdog.py, phases "wait for weights", "generate", "score"): when
that stops it, the trainer stops with its line and exit status 5 (`GenerationStalled`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from grpo import phases
from grpo.config import ModelConfig, RunConfig, TrainerConfig
from grpo.run.sampling import RolloutBatch
from grpo.run.watchdog import Watchdog, timeline_path
from rewards.sandbox import die_with_parent
from rollout.base import set_progress_hook

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting trainer checks that the generation process is alive
IN_FLIGHT_FILE = "in_flight.pt"  # a checkpoint's batches sampled ahead of its step


class GenerationError(RuntimeError):
    """The generation process failed; the message is its own error."""


class GenerationStalled(GenerationError):
    """The generation process's watchdog stopped it (no progress for `trainer.stall_stop_s`); the
    message is its line."""


def effective_staleness(cfg: RunConfig, device: torch.device) -> int:
    """`trainer.max_staleness`, or 0 (with a warning) where generation shares the trainer's device."""
    k, ro = cfg.trainer.max_staleness, cfg.rollout
    if not k:
        return 0
    if ro.engine == "vllm" and ro.vllm.mode != "server":
        log.warning("trainer.max_staleness=%d needs generation on its own device or process; colocated vLLM "
                    "shares the device with the trainer, so this run is synchronous (max_staleness 0). "
                    "Use rollout.vllm.mode=server for asynchronous RL on GPUs.", k)
        return 0
    if ro.engine == "hf" and device.type != "cpu":
        log.warning("trainer.max_staleness=%d with the transformers engine runs on CPU only; on %s this run is "
                    "synchronous (max_staleness 0). Use rollout.engine=vllm with rollout.vllm.mode=server.",
                    k, device.type)
        return 0
    return k


def thread_split(trainer: TrainerConfig) -> tuple[int, int]:
    """(trainer threads, generation threads): the generation process gets `generation_threads`,
    or half of `trainer.threads` (of the CPUs when unset), and the trainer keeps the rest."""
    total = trainer.threads or os.cpu_count() or 2
    gen = trainer.generation_threads or max(1, total // 2)
    return max(1, total - gen), gen


@dataclass(frozen=True)
class InFlight:
    """A batch sampled ahead of the trainer, and the prompt sampler's state after drawing it."""

    step: int
    batch: RolloutBatch
    sampler_epoch: int
    sampler_position: int


@dataclass(frozen=True)
class _Spec:
    """What the generation process needs to start (pickled to it)."""

    cfg: RunConfig
    model_path: str | None  # the checkpoint's model, None for the recipe's
    first_step: int  # the first step it samples
    base_version: int  # the version of the first weights it receives
    staleness: int
    threads: int
    sampler_epoch: int
    sampler_position: int
    output_dir: str  # the run directory (the watchdog writes its heartbeat and stacks there)


# --- the generation process --------------------------------------------------------------------


def _generation_side(spec: _Spec):
    """(the sampling context, the module that receives weights or None)."""
    from grpo.data.prompts import PromptSampler
    from grpo.data.sources import load_rows
    from grpo.model.loading import load_policy
    from grpo.run.sampling import SamplingContext, engine_lengths, make_scorer, sampling_params
    from rollout import make_engine
    from rollout.base import find_routers

    cfg, device = spec.cfg, torch.device("cpu")
    if cfg.rollout.engine == "hf":
        model, tokenizer = load_policy(cfg.model, device, path=spec.model_path, progress=cfg.logging.progress,
                                       seed=cfg.trainer.seed)
        model.eval().requires_grad_(False)
    else:  # vLLM server: the server holds the weights; the client needs the config and tokenizer only
        model, tokenizer = _config_only(cfg.model, spec.model_path)
    record = bool(find_routers(model)) and cfg.moe.routing_replay == "R3" if cfg.rollout.engine == "hf" else False
    rows = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)[0]
    engine = make_engine(cfg.rollout, model, tokenizer, device, seed=cfg.trainer.seed, record_routing=record,
                         **engine_lengths(cfg, tokenizer, rows))  # it samples training prompts only
    prompts = PromptSampler(rows, seed=cfg.data.seed, epoch=spec.sampler_epoch, position=spec.sampler_position)
    ctx = SamplingContext(cfg, engine, make_scorer(cfg), tokenizer, prompts,
                          sampling=sampling_params(cfg.rollout, record_routing=record), hide=(spec.output_dir,))
    return ctx, (model if cfg.rollout.engine == "hf" else None)


def _config_only(model: ModelConfig, path: str | None):
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from grpo.model.loading import resolve_model_source

    name = resolve_model_source(path or model.name_or_path)
    kwargs = {"trust_remote_code": model.trust_remote_code}
    if model.revision and path is None:
        kwargs["revision"] = model.revision
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return SimpleNamespace(config=AutoConfig.from_pretrained(name, **kwargs), name_or_path=name), tokenizer


def weights_message(cfg: RunConfig, model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """What the trainer sends the generation process for one version of the policy, as private
    copies (the trainer keeps updating its own tensors): ("state", tensors, None) for the
    transformers engine (a LoRA run: the adapter's parameters only, the generation process loaded
    the same frozen base and adapter layout); for the vLLM server, what `grpo.run.step.sync_engine`
    would push: ("adapter", tensors, config) in PEFT's format (`model.lora.sync: adapter`), else
    ("state", the merged or full weights, None)."""
    from grpo.model.lora import adapter_payload, merged_state
    from grpo.run.checkpoint import full_model_state, lora_state

    lora = cfg.model.lora
    if lora is None:  # full_model_state's CPU tensors are the trainer's own: copy them
        return "state", {k: v.clone() for k, v in full_model_state(model).items()}, None
    if cfg.rollout.engine != "vllm":
        return "state", lora_state(model), None  # copies already
    if lora.sync == "adapter":
        return "adapter", *adapter_payload(model, lora_state(model))
    return "state", {k: v.cpu().clone() for k, v in merged_state(model).items()}, None


def _load_version(ctx, model, weights: tuple[str, dict[str, torch.Tensor], dict | None]) -> None:
    kind, tensors, config = weights
    if kind == "adapter":  # vLLM server, LoRA: a new adapter version
        ctx.engine.update_adapter(tensors, config)
    elif model is not None:  # the transformers engine decodes with `model`: copy the parameters in
        own = dict(model.named_parameters())
        ctx.engine.update_weights((k, v) for k, v in tensors.items() if k in own)
    else:  # vLLM server: push the whole state
        ctx.engine.update_weights(tensors.items())


def _generate(spec: _Spec, weights_q, batches_q) -> None:
    """The generation process: sample steps first_step .. steps in order, each with the weights
    of step max(base_version, s - 1 - staleness), waiting for those to be published."""
    from grpo.run.sampling import collect_rollouts

    die_with_parent()
    # the trainer handles Ctrl-C and SIGTERM (it still needs this process's in-flight batches for the
    # checkpoint it writes on the way out), then stops this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stalled(line: str) -> None:  # the watchdog stops this process: the trainer stops with its line
        batches_q.put(("stalled", line))
        batches_q.close()
        batches_q.join_thread()

    try:
        torch.set_num_threads(spec.threads)
        ctx, model = _generation_side(spec)
        version, limits = -1, spec.cfg.trainer
        set_progress_hook(phases.beat)
        phases.record_to(timeline_path(spec.output_dir, "generation", 0), "generation", 0)
        try:
            with Watchdog(spec.output_dir, warn_s=limits.stall_warn_s, stop_s=limits.stall_stop_s, role="generation",
                          on_stop=stalled):
                for step in range(spec.first_step, spec.cfg.trainer.steps + 1):
                    phases.set_step(step)
                    need, t = max(spec.base_version, step - 1 - spec.staleness), time.perf_counter()
                    with phases.phase("wait for weights"):
                        while version < need:
                            message = weights_q.get()
                            if message is None:  # the trainer is done
                                return
                            version, weights = message
                            _load_version(ctx, model, weights)
                            del weights
                    batch = collect_rollouts(ctx, step, policy_version=version)
                    batch = replace(batch, generation_wait_s=time.perf_counter() - t)
                    batches_q.put(("batch", InFlight(step, batch, ctx.prompts.epoch, ctx.prompts.position)))
        finally:
            phases.record_to(None)
            ctx.scorer.close()
            ctx.close_environment()
            ctx.engine.close()
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the trainer, then exit 1
        batches_q.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        batches_q.close()
        batches_q.join_thread()
        os._exit(1)


# --- the trainer's side ------------------------------------------------------------------------


class AsyncRollouts:
    """The trainer's end of the pipeline: `take(step)` the batch of a step, `publish(step, model)`
    the weights after it, `in_flight(step)` what a checkpoint after it must keep."""

    def __init__(self, cfg: RunConfig, *, output_dir: str | Path, staleness: int, start_step: int,
                 model_path: str | None, saved: list[InFlight], sampler_epoch: int, sampler_position: int,
                 model: torch.nn.Module):
        self.cfg, self.k, self.steps = cfg, staleness, cfg.trainer.steps
        self.ready: dict[int, InFlight] = {f.step: f for f in saved}
        self.base = start_step - 1  # the version of the weights the trainer starts from
        self.first_generated = start_step + len(saved)
        self.process = None
        if self.first_generated > self.steps:
            return
        trainer_threads, gen_threads = thread_split(cfg.trainer)
        torch.set_num_threads(trainer_threads)
        spec = _Spec(cfg, model_path, self.first_generated, self.base, staleness, gen_threads, sampler_epoch,
                     sampler_position, str(output_dir))
        mp = torch.multiprocessing.get_context("spawn")
        self.weights_q, self.batches_q = mp.Queue(), mp.Queue()
        self.process = mp.Process(target=_generate, args=(spec, self.weights_q, self.batches_q),
                                  name="grpo-generation", daemon=False)
        self.process.start()
        log.info("asynchronous RL: max_staleness %d, generation process %d (%d threads), trainer %d threads",
                 staleness, self.process.pid, gen_threads, trainer_threads)
        self._send(self.base, model)

    # versions the generation process will ask for: max(base, s - 1 - k) for its steps
    def _needed(self, version: int) -> bool:
        return self.process is not None and max(self.base, self.first_generated - 1 - self.k) <= version <= self.steps - 1 - self.k

    def _send(self, version: int, model: torch.nn.Module) -> None:
        if version == self.base or self._needed(version):
            self.weights_q.put((version, weights_message(self.cfg, model)))

    def publish(self, step: int, model: torch.nn.Module) -> None:
        """The weights after `step`'s update (version `step`), if a later batch will use them."""
        if self.process is not None and step != self.base and self._needed(step):
            self._send(step, model)

    def _receive(self) -> None:
        try:
            message = self.batches_q.get(timeout=POLL_S)
        except queue.Empty:
            if self.process is not None and not self.process.is_alive():
                raise GenerationError(f"the generation process exited with status {self.process.exitcode} "
                                      "without reporting an error") from None
            return
        if message[0] == "stalled":
            raise GenerationStalled(message[1])
        if message[0] == "error":
            log.debug("generation process traceback:\n%s", message[2])
            raise GenerationError(f"generation failed: {message[1]}")
        self.ready[message[1].step] = message[1]

    def take(self, step: int) -> RolloutBatch:
        """The batch of `step`, waiting for it (the wait is recorded on the batch)."""
        t = time.perf_counter()
        while step not in self.ready:
            self._receive()
        return replace(self.ready.pop(step).batch, update_wait_s=time.perf_counter() - t)

    def in_flight(self, step: int) -> tuple[list[InFlight], tuple[int, int] | None]:
        """The batches of steps step+1 .. step+k (waiting for them: they need no newer weights) and the
        sampler state after the last of them (None when there is none: the last step)."""
        upto = min(step + self.k, self.steps)
        while any(s not in self.ready for s in range(step + 1, upto + 1)):
            self._receive()
        kept = [self.ready[s] for s in range(step + 1, upto + 1)]
        return kept, ((kept[-1].sampler_epoch, kept[-1].sampler_position) if kept else None)

    def close(self) -> None:
        """Stop the generation process (it is waiting for weights or sampling a batch nobody needs)."""
        if self.process is None:
            return
        self.weights_q.put(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        # Let the queue's feeder thread finish what it is writing (it may be inside torch, sharing a
        # tensor's storage): left running into interpreter exit, it can abort the process. Bounded,
        # in case the pipe is full and its reader is gone.
        self.weights_q.close()
        flush = threading.Thread(target=self.weights_q.join_thread, name="grpo-weights-flush", daemon=True)
        flush.start()
        flush.join(timeout=5)
        self.process = None

    def __enter__(self) -> AsyncRollouts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_in_flight(path: Path) -> list[InFlight]:
    return torch.load(path, weights_only=False) if path.is_file() else []
