"""The prompt prefill and the generic decode step, through the model's own forward and its KV cache.

- the prompt batch (left-padded once) is prefilled by the transformers model itself (`prefill`), so
  routing capture and every architecture transformers supports work unchanged;
- `GenericStepper` runs the decode steps of every model the fast Qwen3 step (`rollout.hf.qwen3`)
  does not take: the model's forward with a transformers cache and a preallocated attention mask;
  finished rows are dropped from the batch and the cache (`select`).

`cache_keyword` and `output_cache` hide the transformers version's name of the KV cache (the
trainer's logprob pass uses them too).
"""

from __future__ import annotations

import functools
import inspect

import torch

from rollout.hf.routing import RoutingRecorder


@functools.cache
def _cache_keyword_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The name of the KV-cache argument (and output field) of a transformers model's forward:
    `cache` in transformers >= 5.20, `past_key_values` before (vLLM's CPU build pins 5.19)."""
    base = getattr(model, "get_base_model", None)  # a peft model forwards its arguments to the base
    return _cache_keyword_of(type(base() if callable(base) else model))


def output_cache(out):
    """The KV cache a transformers forward returned, under either name."""
    return out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (a ModelOutput)


def prefill(model, input_ids, attention, positions, record: bool):
    """Run the prompt batch through the transformers model.

    Returns logits of the last position [B, V], the transformers cache, and, when recording,
    the routed experts of every prompt position [B, W, layers, top_k] (int16).
    """
    recorder = RoutingRecorder(model) if record else None
    if recorder is not None:
        recorder.__enter__()
    try:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    output_router_logits=False, logits_to_keep=1)
    finally:
        if recorder is not None:
            recorder.__exit__()
    routes = None
    if recorder is not None:
        flat = recorder.end_call()  # [B*W, L, k] or None for a dense model
        if flat is None:
            raise ValueError("record_routing was requested but the model has no MoE routers")
        routes = flat.view(input_ids.shape[0], input_ids.shape[1], *flat.shape[1:])  # [B, W, L, k]
    return out.logits[:, -1, :], output_cache(out), routes


class GenericStepper:
    """Decode steps through the model's own forward and a transformers cache (any architecture)."""

    def __init__(self, model, cache, attention: torch.Tensor, positions: torch.Tensor, max_new: int, record: bool):
        self.model, self.cache, self.record = model, cache, record
        width = attention.shape[1]
        self.width = width
        self.attention = torch.cat([attention, attention.new_ones(attention.shape[0], max_new)], dim=1)  # [B, W+N]
        self.next_pos = positions[:, -1:] + 1  # [B, 1]
        self.steps = 0

    def select(self, keep: torch.Tensor) -> None:
        self.attention, self.next_pos = self.attention[keep], self.next_pos[keep]
        self.cache.batch_select_indices(keep)

    def step(self, token: torch.Tensor):
        """token: [A]. Returns logits [A, V] and routes [A, L, k] (int16) or None."""
        self.steps += 1
        recorder = RoutingRecorder(self.model) if self.record else None
        if recorder is not None:
            recorder.__enter__()
        try:
            out = self.model(input_ids=token[:, None], attention_mask=self.attention[:, : self.width + self.steps],
                             position_ids=self.next_pos, use_cache=True, output_router_logits=False,
                             **{cache_keyword(self.model): self.cache})
        finally:
            if recorder is not None:
                recorder.__exit__()
        self.cache = output_cache(out)
        self.next_pos = self.next_pos + 1
        routes = recorder.end_call() if recorder is not None else None
        return out.logits[:, -1, :], routes
