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
3. runs the experts' gate/up and down projections: while the load is even enough
   (`PADDED_MAX_WASTE`), as two batched products over slots padded to the busiest expert's count
   (few operations, which is what small models on CPU pay for); otherwise as two grouped products
   over the sorted pairs (`torch._grouped_mm`, where it runs: float32 on CPU), or each expert on
   its contiguous slice, with the weight tensors split once per call (`unbind`, whose backward
   stacks the per-expert gradients into one tensor instead of E zero-filled ones);
4. weights the outputs by their routing weights and adds them back per token (`index_add`).

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


# Pad to a per-expert capacity (one batched product) while that wastes at most this factor of the
# routed pairs' work and the padded activations stay under PADDED_MAX_BYTES; above it, torch's
# grouped product where it runs (float32 on CPU), else a loop over the experts. Measured on this
# project's 2-core machine (1024 pairs, 8 experts of 128x256): even load, padded 2.2 ms forward +
# backward, grouped 2.8, loop 3.4; load 2.3x uneven, grouped 2.6, loop 3.1, padded 4.5.
PADDED_MAX_WASTE = 1.5
PADDED_MAX_BYTES = 256 * 2**20
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm (with autograd) runs for this device and dtype; probed once."""
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_WORKS:
        works = hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.dtype == torch.float32
        if works:
            try:  # with autograd on, whatever mode the first caller runs in (the engine's inference mode)
                with torch.inference_mode(False), torch.enable_grad():
                    a = torch.ones(4, 16, dtype=x.dtype, device=x.device, requires_grad=True)
                    w = torch.ones(2, 16, 16, dtype=x.dtype, device=x.device, requires_grad=True)
                    out = torch._grouped_mm(a, w.transpose(1, 2), offs=torch.tensor([1, 4], dtype=torch.int32))
                    (out * torch.ones_like(out)).sum().backward()
                    works = bool(torch.equal(out.detach(), torch.full((4, 16), 16.0, dtype=x.dtype)))
            except (RuntimeError, NotImplementedError):
                works = False
        _GROUPED_MM_WORKS[key] = works
    return _GROUPED_MM_WORKS[key]


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    num_experts = self.num_experts
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # [T*k] pairs grouped by expert
    per_expert = torch.bincount(flat, minlength=num_experts)[:num_experts]  # pairs per expert (EP sentinels cut)
    counts = per_expert.tolist()
    routed = sum(counts)
    order = order[:routed]  # sentinel ids (>= num_experts) sort last and are dropped
    token_of = order // top_k  # [R] token of each pair
    x = hidden_states.index_select(0, token_of)  # [R, H]
    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)
    first = self.gate_up_proj if has_gate else self.up_proj  # [E, out, H] ([E, H, out] when transposed)
    first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    down_bias = self.down_proj_bias if has_bias else None
    out = torch.zeros_like(hidden_states)  # [T, H]
    if routed == 0:
        return out
    capacity = max(counts)
    width = max(first.shape[1:])
    padded = (num_experts * capacity <= PADDED_MAX_WASTE * routed
              and num_experts * capacity * width * hidden_states.element_size() <= PADDED_MAX_BYTES)
    if padded:  # one batched product per projection over [E, capacity, .] slots
        starts = per_expert.cumsum(0) - per_expert  # [E]
        expert_of = flat[order]  # [R]
        slot = expert_of * capacity + (torch.arange(routed, device=flat.device) - starts[expert_of])  # [R]
        xs = x.new_zeros(num_experts * capacity, x.shape[-1]).index_copy(0, slot, x)  # [E*C, H]
        xs = xs.view(num_experts, capacity, -1)  # [E, C, H]
        h = torch.bmm(xs, first if transposed else first.transpose(1, 2))  # [E, C, out]
        if first_bias is not None:
            h = h + first_bias[:, None, :]
        h = self._apply_gate(h) if has_gate else self.act_fn(h)  # [E, C, I]
        h = torch.bmm(h, self.down_proj if transposed else self.down_proj.transpose(1, 2))  # [E, C, H]
        if down_bias is not None:
            h = h + down_bias[:, None, :]
        y = h.reshape(num_experts * capacity, -1).index_select(0, slot)  # [R, H]
    elif first_bias is None and down_bias is None and _grouped_mm_works(x):  # one grouped product per projection
        offsets = per_expert.cumsum(0).to(torch.int32)  # [E] end of each expert's slice
        h = torch._grouped_mm(x, first if transposed else first.transpose(1, 2), offs=offsets)  # [R, out]
        h = self._apply_gate(h) if has_gate else self.act_fn(h)  # [R, I]
        y = torch._grouped_mm(h.contiguous(), self.down_proj if transposed else self.down_proj.transpose(1, 2),
                              offs=offsets)  # [R, H]
    else:  # per-expert products on contiguous slices
        firsts, downs = first.unbind(0), self.down_proj.unbind(0)
        first_biases = first_bias.unbind(0) if first_bias is not None else None
        down_biases = down_bias.unbind(0) if down_bias is not None else None
        outputs = []
        for e, xe in enumerate(x.split(counts)):
            if xe.shape[0] == 0:
                continue
            h = _project(xe, firsts[e], first_biases[e] if first_biases else None, transposed)  # [n, out]
            h = self._apply_gate(h) if has_gate else self.act_fn(h)  # [n, I]
            h = _project(h, downs[e], down_biases[e] if down_biases else None, transposed)  # [n, H]
            outputs.append(h)
        y = torch.cat(outputs)  # [R, H]
    if getattr(self, "has_post_expert_norm", False):  # a per-row norm: the same on any of the layouts above
        y = self.post_expert_norm(y)
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)  # [R, 1]
    return out.index_add(0, token_of, y * weights.to(hidden_states.dtype))


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
