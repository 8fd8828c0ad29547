"""A sorted-dispatch experts forward for training MoE models on CPU.

transformers 5 lets a model choose how its experts module runs (`experts_implementation`):
`eager` loops over the experts that were hit and indexes each one's slice of the 3-D weight
tensors, `grouped_mm` calls `torch._grouped_mm` (fast on recent CUDA GPUs, a Python fallback
elsewhere), `batched_mm` gathers one weight matrix per (token, slot). For training on CPU, all
three spend more time in bookkeeping than in matrix products: the eager loop indexes
`gate_up_proj[e]` per expert, and each such index's backward writes a zero-filled copy of the
whole [E, 2I, H] gradient; the others move far more memory than the products need.

`sorted_experts_forward` (registered as `experts_implementation="grpo_sorted"`):

1. sorts the T x k (token, slot) pairs by expert (a stable argsort), counts pairs per expert;
2. gathers the hidden states once in that order;
3. runs each expert's gate/up and down projections on its contiguous slice, with the weight
   tensors split once per call (`unbind`, whose backward stacks the per-expert gradients into one
   tensor instead of E zero-filled ones);
4. weights the outputs by their routing weights and adds them back per token (`index_add_`).

The arithmetic is the eager module's (same products, same order of summation per token up to
the k-way add), so it matches `eager` to float rounding; tests check values and gradients for
Qwen3-MoE, Qwen2-MoE, OLMoE and Mixtral. It honours the experts module's layout flags (bias,
transposed weights, custom gating via `_apply_gate`, post-expert norm) and expert-parallel
sentinels (ids >= num_experts are skipped; their routing weights are zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "grpo_sorted"


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)  # [n, out]
    return out + bias if bias is not None else out


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    num_experts = self.num_experts
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k] pairs grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # pairs per expert (+ EP sentinels)
    routed = sum(counts[:num_experts])
    order = order[:routed]  # sentinel ids (>= num_experts) sort last and are dropped
    token_of = order // top_k  # [R] token of each pair
    x = hidden_states.index_select(0, token_of)  # [R, H]
    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    first = self.gate_up_proj if has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if getattr(self, "has_bias", False) else None
    down_bias = self.down_proj_bias if getattr(self, "has_bias", False) else None
    firsts, downs = first.unbind(0), self.down_proj.unbind(0)
    first_biases = first_bias.unbind(0) if first_bias is not None else None
    down_biases = down_bias.unbind(0) if down_bias is not None else None
    outputs = []
    for e, xs in enumerate(x.split(counts[:num_experts])):
        if xs.shape[0] == 0:
            continue
        h = _project(xs, firsts[e], first_biases[e] if first_biases else None, transposed)  # [n, 2I] or [n, I]
        h = self._apply_gate(h) if has_gate else self.act_fn(h)  # [n, I]
        h = _project(h, downs[e], down_biases[e] if down_biases else None, transposed)  # [n, H]
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        outputs.append(h)
    out = torch.zeros_like(hidden_states)  # [T, H]
    if not outputs:
        return out
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)  # [R, 1]
    y = torch.cat(outputs) * weights.to(hidden_states.dtype)  # [R, H]
    return out.index_add(0, token_of, y)


def register() -> str:
    """Make `experts_implementation="grpo_sorted"` known to transformers; returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_experts_forward)
    return NAME


def experts_implementation(requested: str | None, device: torch.device) -> str | None:
    """The experts implementation to load a policy with: the recipe's choice if it names one,
    else the sorted forward on CPU and transformers' own default (grouped_mm where it
    dispatches) elsewhere. Registers the sorted forward when it is the answer."""
    name = requested or (NAME if device.type == "cpu" else None)
    return register() if name == NAME else name
