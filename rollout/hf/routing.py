"""Recording the experts every token was routed to, for routing replay in the trainer.

For MoE models the engine records the routed experts with forward hooks on the routers during
prefill (and in the generic decode step); the fast Qwen3 stepper records its own top-k choices.
"""

from __future__ import annotations

import torch

from rollout.base import find_routers


class RoutingRecorder:
    """Collects, per forward call, the top-k expert indices every MoE router chose.

    Works with transformers MoE blocks whose router module returns `(logits, weights, indices)`
    (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral in transformers >= 5). `end_call` returns one tensor
    [tokens_in_call, num_layers, top_k] per forward.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = find_routers(model)
        self._current: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for router in self.routers:
            self._handles.append(router.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, output) -> None:
        indices = output[2] if isinstance(output, tuple) else None
        if indices is not None:
            self._current.append(indices.detach().to(torch.int16))

    def end_call(self) -> torch.Tensor | None:
        """Stack what the routers recorded during the last forward: [tokens, layers, top_k]."""
        if not self._current:
            return None
        stacked = torch.stack(self._current, dim=1)  # [tokens, layers, top_k]
        self._current = []
        return stacked

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
