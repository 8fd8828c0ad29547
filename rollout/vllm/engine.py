"""The colocated vLLM rollout engine (`VLLMEngine`); server mode lives in `rollout/vllm/server.py`.

`VLLMEngine`: one `vllm.LLM` per training process, sharing the device with the policy.
- Layout. Under torch.distributed with several ranks it uses vLLM's `external_launcher` executor:
  consecutive ranks form tensor-parallel groups of `tensor_parallel_size` ([0, 1], [2, 3], ...),
  each group is one vLLM engine, and every rank of a group submits the group's whole batch
  (`generate` all-gathers prompts and seeds inside the group and keeps its own slice). In one
  process the engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).
- Seeds. Each prompt's seed (`SamplingParams.prompt_seeds`, from the trainer's step and global
  prompt index) becomes its request's seed, and vLLM gives the j-th of its n completions `seed + j`,
  so a prompt samples the same completions whatever batch, rank or process count it lands in.
  On CPU no prompt is split across engine steps (`_cpu_scheduler_args`): vLLM cannot rewind a
  seeded CPU generator after a split prefill.
- Weights. `update_weights` renames transformers parameters (`hf_to_vllm_weights`) and runs
  `rollout.vllm.worker.reload_in_place` on every worker (`LLM.collective_rpc`): vLLM's layer-wise
  in-place reload, plus the post-load processing vLLM 0.32 skips on CPU (MoE prepacking, tied
  heads); an update that misses a parameter is an error. The prefix cache is reset after it.
- Adapters (LoRA runs, `model.lora.sync: adapter`). Built with `lora_rank`, the engine runs vLLM's
  LoRA support; `update_adapter` writes each new adapter version in PEFT's format to RAM
  (/dev/shm), loads it under a new id, removes the previous one, and every later `generate` samples
  with it. The base weights are never pushed.
- Memory phases. `before_update` (called by the train loop) puts the engine to sleep where the
  platform has vLLM's sleep mode (CUDA/ROCm/XPU); elsewhere the option is turned off with one log line.
- The trainer's process is left as it was: vLLM reseeds the global RNGs and (CPU) disables
  `torch.set_num_threads` while it starts, and its shutdown destroys the default process group;
  the engine restores the first two and keeps the trainer's group.
- Routed experts (R3) need vLLM's Model Runner V2 (Triton): an error at start-up on CPU; on GPU
  they come back on `CompletionOutput.routed_experts`.
- Architectures on vLLM's CPU build (checked against transformers after real updates, to 3e-6):
  Qwen2 and Qwen3 dense (tied or not), Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2 (MLA with the
  512 + 64 latent only; with plain RoPE the engine turns off vLLM's CPU rotary kernel, which
  rotates MLA's 3-D query/key views wrongly).

Logprobs: the engine asks for the sampled token's logprob (`logprobs=0`) with
`logprobs_mode="processed_logprobs"`: log-softmax of the logits *after* temperature and top-k/top-p
masking, i.e. the log-probability of the drawn token under the distribution it was drawn from,
which is what `Rollout.logprobs` promises (vLLM's default, `raw_logprobs`, ignores the sampling
transforms).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from rollout.base import Rollout, SamplingParams
from rollout.turns import Episodes
from rollout.vllm.adapters import AdapterVersions, lora_rank_slot
from rollout.vllm.layout import (
    default_group_kept,
    flatten_gathered,
    process_state_kept,
    prompt_request_seeds,
    request_seeds,
    set_launcher_env,
    tp_groups,
)
from rollout.vllm.requests import filter_engine_kwargs, request_output_to_rollouts, to_vllm_sampling_kwargs
from rollout.vllm.weights import hf_to_vllm_weights

logger = logging.getLogger(__name__)

__all__ = ["VLLMEngine"]


def _mla_with_default_rope(model: str) -> bool:
    """True for a multi-head latent attention model (DeepSeek-V2/V3 family) whose RoPE is plain
    (rope_type "default"); other rope types take vLLM's DeepSeek scaling rotary, which is PyTorch."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # vLLM reports an unreadable model itself
        return False
    config = getattr(config, "get_text_config", lambda: config)()
    if not getattr(config, "kv_lora_rank", None):
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) == "default"


def _cpu_scheduler_args() -> dict[str, Any]:
    """vLLM scheduler arguments on CPU: chunked prefill off, so no seeded request's prompt is split.

    Every request the trainer sends is seeded (`prompt_seeds`), and a seeded request samples from its
    own torch.Generator. When vLLM's V1 model runner computes only part of a request's prompt in a
    step (a prefill split across steps: `discard_request_mask`), it throws that step's sampled token
    away and rewinds the request's generator (`gen.set_offset(gen.get_offset() - 4)` in
    `gpu_model_runner.py`), which a CPU generator refuses ("CPU Generator does not use offset"). With
    chunked prefill on, any step whose prompts exceed `max_num_batched_tokens` (4096 on CPU) splits
    one. With it off, the scheduler admits a waiting request only when its whole remaining prompt
    fits the step's budget, and vLLM makes that budget at least `max_model_len` (it refuses a smaller
    one), so every sequence fits; a running request only decodes (1 token) and a preempted one is
    admitted again whole. A computed count below the request's length, the discard condition, then
    never occurs (`tests/rollout/test_vllm_colocated.py` counts the discards of a large seeded batch:
    none). vLLM does the same itself for MLA models on CPU. CUDA generators keep offsets: GPUs keep
    chunked prefill.
    """
    return {"enable_chunked_prefill": False}


class VLLMEngine:
    """vLLM colocated with the trainer: one `vllm.LLM` per process (see the module docstring).

    Args:
        model: local path (or hub name) of the transformers checkpoint vLLM starts from.
        tensor_parallel_size: devices per vLLM engine; must divide the torch.distributed world size.
        gpu_memory_utilization: fraction of each GPU vLLM may take (weights + KV cache); leave room
            for the policy, gradients and optimizer state. (On CPU vLLM reads it as a share of RAM;
            `kv_cache_memory_bytes` is the better knob there.)
        kv_cache_memory_bytes: KV-cache size; None: from `gpu_memory_utilization` on GPU, 256 MiB on CPU
            (`make_engine` passes one sized from the recipe, `rollout.vllm.sizing`).
        enable_sleep_mode: allow `sleep`/`wake` (vLLM's CuMem allocator). Where the platform has no
            sleep mode (CPU) it is turned off with one log line and `sleep`/`wake` do nothing.
        sleep_level: what `sleep()` does by default: 1 offloads weights to CPU and drops the KV
            cache; 2 drops both (less host memory, but `update_weights` must then load every
            parameter before the next `generate`).
        seed: base seed of unseeded requests; TP group g uses `seed + g` (the same within a group).
        dtype, max_model_len, enable_prefix_caching, enforce_eager, max_num_seqs,
        max_num_batched_tokens: passed to `vllm.LLM`. On CPU chunked prefill is off (seeded requests
            cannot survive a split prefill there, see `_cpu_scheduler_args`), so
            `max_num_batched_tokens` must be at least `max_model_len` (vLLM's default is).
        record_routing: build the engine with `enable_return_routed_experts` so MoE routing can be
            returned (`SamplingParams.record_routing`); an error at start-up where vLLM cannot.
        model_type, tie_word_embeddings: for the parameter-name mapping; read from the checkpoint's
            config when None.
        lora_rank: build the engine with vLLM's LoRA support for adapters up to this rank
            (`update_adapter` pushes a new version; None: no LoRA).
        engine_kwargs: further `vllm.LLM` / `EngineArgs` arguments.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        record_routing: bool = False,
        model_type: str | None = None,
        tie_word_embeddings: bool | None = None,
        lora_rank: int | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # vLLM logs to stdout by default; our commands print their results there (`grpo eval`'s table).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        import vllm
        from vllm.engine.arg_utils import EngineArgs

        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.sleep_level = sleep_level
        self.enable_sleep_mode = self._check_platform(record_routing, enable_sleep_mode)
        self.record_routing = record_routing
        backend = self._join_process_layout(tensor_parallel_size)
        wanted: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode,
            "seed": seed + self.tp_group_index,
            "dtype": dtype,
            "enable_prefix_caching": enable_prefix_caching,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "distributed_executor_backend": backend,
            "enable_return_routed_experts": True if record_routing else None,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            # vLLM's RAM share default on CPU (0.92) would not fit beside a trainer
            "kv_cache_memory_bytes": 256 << 20 if kv_cache_memory_bytes is None and self.on_cpu else kv_cache_memory_bytes,
        }
        if lora_rank is not None:  # one adapter at a time: the policy's current version
            wanted.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_slot(lora_rank))
        if self.on_cpu:
            wanted.update(_cpu_scheduler_args())
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if self.on_cpu and _mla_with_default_rope(model):
            # vLLM 0.32's CPU rotary kernel reads only 2-D [tokens, heads * dim] input, and the MLA wrapper
            # hands it 3-D q/k views: every position but the first gets wrong rotations, with no error
            # (seen here: logprob errors of 5e-3 to 0.8 per token). Its PyTorch rotary is right.
            logger.warning("MLA with default RoPE on vLLM's CPU build: its rotary_embedding kernel is turned off "
                           "(vLLM's own PyTorch rotary runs instead)")
            wanted["compilation_config"] = {"custom_ops": ["all", "-rotary_embedding"]}
        wanted.update(engine_kwargs or {})
        kept, dropped = filter_engine_kwargs(wanted, {f.name for f in dataclasses.fields(EngineArgs)})
        if dropped:
            logger.warning("vLLM %s does not accept %s; ignoring them", vllm.__version__, dropped)
        if "enable_return_routed_experts" in dropped:
            raise RuntimeError(f"vLLM {vllm.__version__} has no enable_return_routed_experts; routing cannot be recorded")
        self.processed_logprobs = "logprobs_mode" in kept
        self._owns_default_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with process_state_kept():
            self.llm = vllm.LLM(model=model, **kept)
        self._read_model_config(model_type, tie_word_embeddings)
        # Seeds for TP groups: every rank of a group draws the same sequence (it is seeded alike and
        # called in lockstep), so the group samples identically whatever the trainer did to the
        # global torch RNG of each rank.
        self._group_rng = random.Random(seed + self.tp_group_index)
        self._asleep: set[str] = set()  # memory tags currently released ("weights", "kv_cache")
        self._weights_discarded = False  # level-2 sleep: weights must be reloaded before generating
        self._adapters = AdapterVersions() if lora_rank is not None else None

    def _check_platform(self, record_routing: bool, enable_sleep_mode: bool) -> bool:
        """Sets `on_cpu`; refuses R3 where vLLM cannot return routed experts; returns whether sleep
        mode stays on (off, with a warning, where the platform has none)."""
        import vllm
        from vllm.platforms import current_platform

        platform = getattr(current_platform, "device_name", None) or type(current_platform).__name__
        self.on_cpu = current_platform.is_cpu()
        if record_routing and self.on_cpu:
            raise RuntimeError(
                f"moe.routing_replay=R3 needs vLLM to return routed experts, which needs its Model Runner V2 "
                f"(Triton); vLLM's CPU build (vllm {vllm.__version__}, platform {platform}) has neither. "
                "Use moe.routing_replay=R2 or none, or rollout.engine=hf, on this machine."
            )
        available = getattr(current_platform, "is_sleep_mode_available", lambda: False)()
        if enable_sleep_mode and not available:
            logger.warning("vLLM has no sleep mode on platform %s: the engine keeps its memory during updates "
                           "(rollout.vllm.enable_sleep_mode ignored)", platform)
            return False
        return enable_sleep_mode

    def _read_model_config(self, model_type: str | None, tie_word_embeddings: bool | None) -> None:
        """What a weight update must match: the checkpoint's manifest, model type and tying."""
        from rollout.vllm.worker import checkpoint_manifest

        self._manifest = checkpoint_manifest(self.llm.llm_engine.model_config)  # what an update must match
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.model_type = model_type or getattr(hf_config, "model_type", "")
        if tie_word_embeddings is None:
            text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
            tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        self.tie_word_embeddings = tie_word_embeddings

    def _join_process_layout(self, tensor_parallel_size: int) -> str | None:
        """Place this process in the engine layout: one engine per TP group of consecutive ranks.
        Returns vLLM's executor backend (None: vLLM's own single-process executor)."""
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if distributed else int(os.environ.get("RANK", "0"))
        groups = tp_groups(world_size, tensor_parallel_size)
        self.tp_size = tensor_parallel_size
        self.tp_group_index = rank // tensor_parallel_size
        self.tp_rank = rank % tensor_parallel_size
        self._tp_group = None
        if world_size > 1:
            if not distributed:
                raise RuntimeError("several ranks but torch.distributed is not initialised; launch with accelerate/torchrun")
            set_launcher_env(rank, int(os.environ.get("LOCAL_RANK", rank)), world_size)
            if tensor_parallel_size > 1:
                # Every rank must create every subgroup, in the same order.
                self._tp_group, _ = dist.new_subgroups_by_enumeration(groups)
            return "external_launcher"
        if tensor_parallel_size > 1:
            raise ValueError(
                "tensor_parallel_size > 1 in a single process would make vLLM spawn its own workers, "
                "where in-process weight loading cannot reach; launch one process per GPU instead"
            )
        # One process: run vLLM's engine core in this process (no EngineCore subprocess), so
        # `update_weights` hands tensors to the model directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return None

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 episodes: Episodes | None = None) -> list[Rollout]:
        import vllm

        if episodes is not None:
            return self._generate_turns(prompts, n, sampling, episodes)
        if sampling.record_routing and not self.record_routing:
            raise ValueError("build VLLMEngine(record_routing=True) to record routed experts")
        plain = sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0
        if not self.processed_logprobs and not plain:
            raise RuntimeError(
                "this vLLM has no logprobs_mode='processed_logprobs'; its logprobs ignore temperature and "
                "top-k/top-p, so they are not the sampler's. Upgrade vLLM (>= 0.10.2) or sample plainly."
            )
        self.wake()
        if self._weights_discarded:
            raise RuntimeError("weights were discarded by sleep(level=2); call update_weights before generate")

        local = [[int(t) for t in p] for p in prompts]
        seeds = prompt_request_seeds(sampling.prompt_seeds, len(local)) if sampling.prompt_seeds else None
        batch, batch_seeds, start = local, seeds, 0
        if self._tp_group is not None:  # every rank of the group submits the group's whole batch
            gathered: list[Any] = [None] * self.tp_size
            torch.distributed.all_gather_object(gathered, (local, seeds), group=self._tp_group)
            batch, offsets = flatten_gathered([g[0] for g in gathered])
            batch_seeds = None if seeds is None else flatten_gathered([g[1] for g in gathered])[0]
            start = offsets[self.tp_rank]

        kwargs = to_vllm_sampling_kwargs(sampling, n)
        base = kwargs.pop("seed", None)
        if batch_seeds is None and base is None and self.tp_size > 1:
            base = self._group_rng.randrange(2**31)
        if batch_seeds is None and base is not None:
            batch_seeds = request_seeds(base, len(batch), n)
        if batch_seeds is None:  # one process per engine: vLLM's global generator is enough
            params: Any = vllm.SamplingParams(**kwargs)
        else:  # seeded requests, distinct per request and completion
            params = [vllm.SamplingParams(**kwargs, seed=s) for s in batch_seeds]
        lora = self._adapters.request if self._adapters is not None else None
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False,
                                    lora_request=lora)
        # Same outputs on every rank of the TP group; keep the ones of this rank's prompts.
        mine = outputs[start : start + len(local)]
        rollouts = []
        for i, out in enumerate(mine):
            rollouts.extend(request_output_to_rollouts(out, i, record_routing=sampling.record_routing))
        return rollouts

    def _generate_turns(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                        episodes: Episodes) -> list[Rollout]:
        """Multi-turn rollouts (`rollout.vllm.turns`): rounds of one request per live row, the
        prefix cache holding each row's past."""
        import vllm

        from rollout.vllm.turns import run_turns

        rows = [[int(t) for t in p] for p in prompts for _ in range(n)]
        if len(episodes) != len(rows):
            raise ValueError(f"{len(episodes)} episodes for {len(rows)} completions")
        if sampling.record_routing or self._tp_group is not None:
            raise ValueError("multi-turn rollouts record no routed experts and run with tensor_parallel_size 1")
        if not self.processed_logprobs and not (sampling.temperature == 1.0 and sampling.top_p == 1.0
                                                and sampling.top_k == 0):
            raise RuntimeError("this vLLM has no logprobs_mode='processed_logprobs' (upgrade vLLM >= 0.10.2)")
        self.wake()
        turn_sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *episodes.stop), prompt_seeds=(), seed=None)
        row_seeds = None
        if sampling.prompt_seeds:
            row_seeds = [s * 1_000_003 + b % n for b in range(len(rows))
                         for s in [sampling.prompt_seeds[b // n]]]
        elif sampling.seed is not None:
            row_seeds = [sampling.seed * 1_000_003 + b for b in range(len(rows))]

        def submit(contexts: list[list[int]], budgets: list[int], seeds: list[int | None]) -> list[Rollout]:
            params = []
            for budget, seed in zip(budgets, seeds):
                kwargs = to_vllm_sampling_kwargs(dataclasses.replace(turn_sampling, max_new_tokens=budget), 1)
                kwargs.pop("seed", None)
                params.append(vllm.SamplingParams(**kwargs, seed=seed))
            lora = self._adapters.request if self._adapters is not None else None  # the policy's current adapter
            outputs = self.llm.generate([{"prompt_token_ids": c} for c in contexts], params, use_tqdm=False,
                                        lora_request=lora)
            return [request_output_to_rollouts(out, i)[0] for i, out in enumerate(outputs)]

        eos = None if sampling.ignore_eos else self.llm.get_tokenizer().eos_token_id
        return run_turns(submit, rows, n, episodes, eos, row_seeds)

    # --- weights ----------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (transformers names) into vLLM in place, then reset the prefix cache.

        Every rank calls this with the full (gathered, unsharded) tensors: each rank's loaders keep
        their own tensor-parallel shard. Tensors may live on any device and dtype; vLLM's loaders
        cast them to the engine's dtype. The update must name every tensor of the checkpoint vLLM
        started from, with its shape, or it is refused before anything is loaded; vLLM then checks
        that every parameter of its model was reached (`rollout.vllm.worker.reload_in_place`, which
        also re-runs the post-load processing that vLLM's CPU backend needs). Unquantised weights only.
        """
        from rollout.vllm.worker import reload_in_place, update_problems

        mapped = hf_to_vllm_weights(
            named_tensors, model_type=self.model_type, tie_word_embeddings=self.tie_word_embeddings
        )
        weights = [(name, tensor.detach()) for name, tensor in mapped]
        problems = update_problems(self._manifest, weights)
        if problems:  # refused before anything is loaded: the engine keeps its current weights
            raise RuntimeError("weight update refused (vLLM keeps its current weights): " + "; ".join(problems))
        if "weights" in self._asleep:
            self._wake_up(["weights"])
        self.llm.collective_rpc(reload_in_place, args=(weights,))
        self._weights_discarded = False
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    @property
    def takes_adapters(self) -> bool:
        """Whether `update_adapter` works (built with `lora_rank`); else the policy's merged weights go in."""
        return self._adapters is not None

    def update_adapter(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
        """Load a new version of the policy's LoRA adapter (PEFT's tensor names and config) and
        sample with it from now on; the previous version is removed. The adapter goes through a
        file in RAM (/dev/shm where there is one): vLLM 0.32 loads adapters from a path only."""
        if self._adapters is None:
            raise RuntimeError("this engine was built without LoRA (lora_rank=None); push merged weights instead")
        if "weights" in self._asleep:
            self._wake_up(["weights"])
        request = self._adapters.request_for(self._adapters.write(tensors, config))
        engine = self.llm.llm_engine
        if engine.add_lora(request) is False:
            raise RuntimeError(f"vLLM refused adapter version {request.lora_int_id} ({request.lora_path})")
        old = self._adapters.swap(request)
        if old is not None:
            engine.remove_lora(old.lora_int_id)
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after an adapter update")

    # --- memory phases ----------------------------------------------------------------------

    def before_update(self) -> None:
        """The training phase starts: release vLLM's device memory (when sleep mode is on)."""
        self.sleep()

    def after_update(self) -> None:
        """Nothing to do: the next `generate` (or `update_weights`) wakes the engine up as needed."""

    def sleep(self, level: int | None = None) -> None:
        """Release vLLM's GPU memory for the training phase (see `sleep_level`)."""
        if not self.enable_sleep_mode or self._asleep == {"weights", "kv_cache"}:
            return
        if self._asleep:  # half awake (weights woken for an update): make the state whole first
            self.wake()
        level = self.sleep_level if level is None else level
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = level == 2

    def wake(self) -> None:
        """Take the GPU memory back (whatever `sleep` released)."""
        if self._asleep:
            self._wake_up(sorted(self._asleep))

    def _wake_up(self, tags: list[str]) -> None:
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # older vLLM: no tags, wakes everything at once
            self.llm.wake_up()
            tags = ["weights", "kv_cache"]
        self._asleep -= set(tags)

    def close(self) -> None:
        """Shut the engine down; the trainer's process group, thread count and RNG stay as they are."""
        llm, self.llm = getattr(self, "llm", None), None
        if getattr(self, "_adapters", None) is not None:
            self._adapters.close()
        if llm is None:
            return
        # vLLM shuts its engine core down from a finalizer when the last reference goes, so the
        # reference is dropped inside the guards too.
        with process_state_kept(), default_group_kept(keep=not self._owns_default_group):
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
            gc.collect()
