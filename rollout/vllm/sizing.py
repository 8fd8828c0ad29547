"""How big the colocated vLLM engine is made: its context (`max_model_len`) and, on CPU, its KV cache.

Both follow from the recipe, not from the model, when the recipe leaves them unset:

- context: the longest prompt the engine will be given (training and evaluation prompts, template
  applied, in tokens) plus the longest completion it may be asked for, rounded up to a multiple of
  `CONTEXT_MULTIPLE` and never above the model's `max_position_embeddings`. vLLM's own default, the
  model's whole context (32k for a 0.5B Qwen2), would reserve a KV cache no CPU default holds.
- KV cache on CPU: room for one group (`group_size` sequences of the context) in vLLM's blocks, and
  never less than `CPU_KV_FLOOR_MB`, today's default. (On GPU vLLM sizes it from
  `gpu_memory_utilization`; nothing is derived there.)

A recipe that needs more context than the model has, or a KV cache larger than this machine's free
memory, is an `EngineSizeError` (one line) before vLLM loads anything. Pure arithmetic on a
transformers config; only `vllm_on_cpu` imports vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import os

__all__ = ["EngineSizeError", "EngineSizes", "engine_sizes", "kv_bytes_per_token", "vllm_on_cpu"]

CONTEXT_MULTIPLE = 128  # vLLM's CPU KV block: a context rounded to it wastes no block
CPU_KV_FLOOR_MB = 256  # the CPU KV cache never shrinks below what every earlier run had
CPU_BLOCK_SIZE = 128  # vLLM 0.32's CPU attention block (tokens); MLA's reference kernel uses 16
CPU_MLA_BLOCK_SIZE = 16
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class EngineSizeError(ValueError):
    """The engine the recipe asks for cannot be built here (context or memory), phrased for a person."""


@dataclasses.dataclass(frozen=True)
class EngineSizes:
    """What `vllm.LLM` is given: None leaves vLLM's own default."""

    max_model_len: int | None
    kv_cache_bytes: int | None
    sequences: int | None = None  # full-length sequences the KV cache holds (CPU, known context)
    derived: tuple[str, ...] = ()  # which of the two came from the recipe's lengths

    def describe(self, longest_prompt: int | None, max_new_tokens: int) -> str:
        """One line: what the engine was given, and why."""
        context = "vLLM's default (the model's)" if self.max_model_len is None else f"{self.max_model_len} tokens"
        if "max_model_len" in self.derived:
            context += f" (longest prompt {longest_prompt} + {max_new_tokens} new, rounded up)"
        if self.kv_cache_bytes is None:
            return f"vLLM engine: context {context}, KV cache from gpu_memory_utilization"
        kv = f"{self.kv_cache_bytes / 2**20:.0f} MiB"
        if self.sequences is not None:
            kv += f" (holds {self.sequences} sequences of {self.max_model_len} tokens)"
        return f"vLLM engine: context {context}, KV cache {kv}"


def text_config(config):
    """The language model's part of a (possibly multimodal) transformers config."""
    return getattr(config, "get_text_config", lambda: config)()


def dtype_bytes(dtype: str) -> int:
    """Bytes per KV element for vLLM's `dtype` ("auto" and unknown names: 4, the conservative side)."""
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def kv_bytes_per_token(config, bytes_per_element: int) -> int:
    """KV-cache bytes one token takes in every layer: layers x 2 (K and V) x KV heads x head dim x
    element bytes; multi-head latent attention (`kv_lora_rank`, DeepSeek-V2/V3) stores one latent
    of kv_lora_rank + qk_rope_head_dim per layer instead.

    >>> from types import SimpleNamespace as C
    >>> kv_bytes_per_token(C(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    ...                      hidden_size=896), 2)  # Qwen2-0.5B in bf16: head dim 896/14 = 64
    12288
    >>> kv_bytes_per_token(C(num_hidden_layers=27, kv_lora_rank=512, qk_rope_head_dim=64), 2)
    31104
    """
    c = text_config(config)
    layers = c.num_hidden_layers
    if getattr(c, "kv_lora_rank", None):
        return layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_element
    heads = c.num_attention_heads if getattr(c, "num_attention_heads", None) else 1
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * bytes_per_element


def context_length(longest_prompt: int, max_new_tokens: int, max_positions: int | None) -> int:
    """The context a recipe needs: prompt + completion, rounded up to `CONTEXT_MULTIPLE`, capped at
    the model's positions; an `EngineSizeError` when the recipe needs more than the model has.

    >>> context_length(300, 200, 32768), context_length(300, 200, 510), context_length(1, 1, None)
    (512, 510, 128)
    """
    needed = longest_prompt + max_new_tokens
    if max_positions is not None and needed > max_positions:
        raise EngineSizeError(
            f"the recipe needs a context of {needed} tokens (longest prompt {longest_prompt} + {max_new_tokens} new) "
            f"but the model has {max_positions} positions: lower rollout.max_new_tokens / eval.max_new_tokens or "
            "set data.max_prompt_tokens"
        )
    rounded = math.ceil(needed / CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE
    return rounded if max_positions is None else min(rounded, max_positions)


def kv_cache_bytes_for(sequences: int, context: int, per_token: int, block_size: int) -> int:
    """Bytes of a KV cache that holds `sequences` sequences of `context` tokens in vLLM's blocks
    (each sequence takes whole blocks; vLLM keeps one block aside, its null block), in whole MiB.

    >>> kv_cache_bytes_for(8, 512, 12288, 128) / 2**20  # (8 x 4 blocks + 1) x 128 x 12 KiB = 49.5 MiB
    50.0
    """
    blocks = sequences * math.ceil(context / block_size) + 1
    return math.ceil(blocks * block_size * per_token / 2**20) * 2**20


def sequences_held(kv_bytes: int, context: int, per_token: int, block_size: int) -> int:
    """Full-length sequences a KV cache of `kv_bytes` holds (the inverse of `kv_cache_bytes_for`)."""
    blocks = kv_bytes // (block_size * per_token) - 1
    return max(0, blocks // math.ceil(context / block_size))


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux `MemAvailable`; None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def engine_sizes(config, *, max_model_len: int | None, kv_cache_mb: int | None, longest_prompt: int | None,
                 max_new_tokens: int, group_size: int, dtype: str, on_cpu: bool,
                 free_bytes: int | None = None, max_num_batched_tokens: int | None = None) -> EngineSizes:
    """The context and KV cache for `vllm.LLM` (see the module docstring).

    config: the model's transformers config. max_model_len, kv_cache_mb: the recipe's (None: derive).
    longest_prompt: tokens of the longest prompt the engine will see (None: unknown, so vLLM's own
    default context stays). max_new_tokens: the longest completion asked for. free_bytes: memory
    the KV cache must fit in on CPU (None: this machine's available memory).
    """
    c = text_config(config)
    derived: list[str] = []
    context = max_model_len
    if context is None and longest_prompt is not None:
        context = context_length(longest_prompt, max_new_tokens, getattr(c, "max_position_embeddings", None))
        derived.append("max_model_len")
    if on_cpu and max_num_batched_tokens is not None and context is not None and max_num_batched_tokens < context:
        raise EngineSizeError(
            f"rollout.vllm.max_num_batched_tokens={max_num_batched_tokens} is less than the context ({context} "
            "tokens): on CPU a prompt is never split across steps, so the budget must hold a whole sequence"
        )
    if not on_cpu:
        return EngineSizes(context, None if kv_cache_mb is None else kv_cache_mb << 20, derived=tuple(derived))
    per_token = kv_bytes_per_token(c, dtype_bytes(dtype))
    block = CPU_MLA_BLOCK_SIZE if getattr(c, "kv_lora_rank", None) else CPU_BLOCK_SIZE
    if kv_cache_mb is not None:
        kv = kv_cache_mb << 20
    elif context is not None:
        kv = max(CPU_KV_FLOOR_MB << 20, kv_cache_bytes_for(group_size, context, per_token, block))
        derived.append("kv_cache")
    else:
        kv = CPU_KV_FLOOR_MB << 20
    free = available_memory() if free_bytes is None else free_bytes
    if free is not None and kv > free:
        what = f"{group_size} sequences of {context} tokens" if "kv_cache" in derived else "rollout.vllm.kv_cache_memory_mb"
        raise EngineSizeError(
            f"vLLM's KV cache would take {kv / 2**20:.0f} MiB ({what}) but this machine has {free / 2**20:.0f} MiB "
            "free: lower rollout.group_size, rollout.max_new_tokens or rollout.vllm.max_model_len / kv_cache_memory_mb"
        )
    held = None if context is None else sequences_held(kv, context, per_token, block)
    return EngineSizes(context, kv, held, tuple(derived))


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here (imports vLLM)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
