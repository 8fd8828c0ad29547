"""Rollout engines behind one Protocol (`rollout.base.RolloutEngine`); `make_engine` picks one.

The package, in the order data travels:

- `rollout.base`: what goes in and comes out (`SamplingParams`, the `Rollout` record), the engine
  Protocol and `find_routers`;
- `make_engine` (here): the engine a recipe's `rollout` section names;
- `rollout.hf`: the transformers engine (`rollout.hf.engine.HFEngine`): prefill, decode step
  (generic or the hand-written Qwen3 one), sampling, stops, routing records;
- `rollout.vllm`: the vLLM engines, colocated (`rollout.vllm.engine.VLLMEngine`) or a client of a
  vLLM server (`rollout.vllm.server.VLLMServerClient`), with their request, weight-name and
  process-layout helpers and the code that runs inside vLLM's workers (`rollout.vllm.worker`).

`vllm` is imported only inside `rollout.vllm`'s functions, and only when the vLLM engine is chosen,
so this package imports on machines without it. Nothing here imports `grpo` or `rewards`.
"""

from __future__ import annotations

import logging

import torch

from rollout.base import Rollout, RolloutEngine, SamplingParams, find_routers

__all__ = ["Rollout", "RolloutEngine", "SamplingParams", "make_engine"]

logger = logging.getLogger(__name__)


def make_engine(rollout, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                *, seed: int, record_routing: bool = False, longest_prompt: int | None = None,
                max_new_tokens: int | None = None, lora_rank: int | None = None) -> RolloutEngine:
    """The engine `rollout.engine` names, built from `rollout.hf` / `rollout.vllm`.

    rollout: a recipe's `rollout` section (`grpo.config.RolloutConfig`). seed: the engine's base
    seed for unseeded requests (the trainer seeds every prompt itself). model: the policy (the HF
    engine decodes with it directly; vLLM starts from its checkpoint, `model.name_or_path`, then
    receives weights through `update_weights`). record_routing: build the vLLM engine so it can
    return routed experts (the HF engine records them per call, on `SamplingParams.record_routing`).
    longest_prompt: tokens of the longest prompt the engine will be given (template applied), and
    max_new_tokens the longest completion (None: `rollout.max_new_tokens`): the colocated vLLM
    engine's context and CPU KV cache follow from them where the recipe leaves those unset
    (`rollout.vllm.sizing`); with longest_prompt None, vLLM's default context (the model's) stays.
    lora_rank: a LoRA policy whose adapter is pushed as such: the colocated vLLM engine starts from
    the base checkpoint with LoRA on (the HF engine decodes with the adapted module itself).
    """
    if rollout.engine == "hf":
        from rollout.hf.engine import HFEngine

        return HFEngine(model, tokenizer, device, fast_decode=rollout.hf.fast_decode)
    if rollout.engine == "vllm":
        if rollout.vllm.mode == "server":  # adapters go through the server's adapter endpoint
            return _vllm_server(rollout.vllm, model, device, record_routing)
        lengths = (longest_prompt, max_new_tokens or rollout.max_new_tokens, rollout.group_size)
        return _vllm_colocated(rollout.vllm, model, seed, record_routing, lengths, lora_rank)
    raise ValueError(f"unknown rollout engine {rollout.engine!r}; known: hf, vllm")


def _vllm_server(v, model: torch.nn.Module, device, record_routing: bool) -> RolloutEngine:
    from rollout.vllm.server import VLLMServerClient, distributed_role

    if record_routing:
        raise ValueError("rollout.vllm.mode=server cannot return routed experts (moe.routing_replay=R3)")
    config = getattr(model, "config", None)
    # every rank generates over HTTP; rank 0 alone pushes weights, the others' update_weights
    # waits for its push (a collective here: every rank builds its engine)
    owner, session = distributed_role()
    return VLLMServerClient(v.server_url, owner=owner, session=session, group_port=v.server_group_port,
                            timeout=v.server_timeout_s, model_type=getattr(config, "model_type", None) or "qwen3_moe",
                            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", None)), device=device)


def _vllm_colocated(v, model: torch.nn.Module, seed: int, record_routing: bool,
                    lengths: tuple[int | None, int, int], lora_rank: int | None = None) -> RolloutEngine:
    """lengths: (longest prompt or None, longest completion, group size), for `engine_sizes`."""
    from rollout.vllm.engine import VLLMEngine
    from rollout.vllm.sizing import engine_sizes, vllm_on_cpu

    config = getattr(model, "config", None)
    checkpoint = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not checkpoint:
        raise ValueError("rollout.engine=vllm needs a model loaded from a checkpoint directory or Hub id")
    dtype = v.dtype
    if dtype == "auto":  # the policy's dtype, so sampler and trainer compute alike (vLLM's CPU "auto" is bf16)
        dtype = str(getattr(model, "dtype", "auto")).removeprefix("torch.")
    if lora_rank is not None and vllm_on_cpu() and find_routers(model):
        # With LoRA on, vLLM 0.32 runs MoE layers through its Triton kernels only (the CPU experts kernel
        # does not take adapters), which have no CPU build: generation would fail at its first MoE layer.
        logger.warning("vLLM's CPU build cannot run LoRA on a Mixture-of-Experts model (its LoRA MoE kernels are "
                       "Triton-only): the policy is pushed as merged weights instead (model.lora.sync: merged)")
        lora_rank = None
    longest_prompt, max_new_tokens, group_size = lengths
    # checked before vLLM loads anything: a context the model lacks, a KV cache this machine lacks
    sizes = engine_sizes(config, max_model_len=v.max_model_len, kv_cache_mb=v.kv_cache_memory_mb,
                         longest_prompt=longest_prompt, max_new_tokens=max_new_tokens, group_size=group_size,
                         dtype=dtype, on_cpu=vllm_on_cpu(), max_num_batched_tokens=v.max_num_batched_tokens)
    if sizes.derived:
        logger.warning(sizes.describe(longest_prompt, max_new_tokens))
    return VLLMEngine(checkpoint, tensor_parallel_size=v.tensor_parallel_size,
                      gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_memory_bytes=sizes.kv_cache_bytes,
                      enable_sleep_mode=v.enable_sleep_mode, sleep_level=v.sleep_level, seed=seed, dtype=dtype,
                      max_model_len=sizes.max_model_len, enable_prefix_caching=v.enable_prefix_caching,
                      enforce_eager=v.enforce_eager, max_num_seqs=v.max_num_seqs,
                      max_num_batched_tokens=v.max_num_batched_tokens, record_routing=record_routing,
                      model_type=getattr(config, "model_type", None),
                      tie_word_embeddings=getattr(config, "tie_word_embeddings", None), lora_rank=lora_rank)
