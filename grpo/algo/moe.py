"""Mixture-of-Experts stability: routing replay, float32 routers, the load-balancing loss and
expert-load metrics.

Every MoE family transformers 5 ships with a top-k router module at `...mlp.gate` returning
`(router_logits, top_k_weights, top_k_indices)` (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral). One
forward hook per router does all of the following, so nothing here subclasses a model:

- **Routing replay** (R2/R3, "Stabilizing MoE RL by aligning training and inference routers",
  2510.11370): the hook replaces the router's top-k indices with recorded ones and recomputes the
  top-k weights from the router's own scores at those indices exactly as the family does
  (`topk_weights`: softmax, or sigmoid for DeepSeek-V3; renormalised per `norm_topk_prob`, always
  for Mixtral, never for DeepSeek-V2; times `routed_scaling_factor`). The experts that run are the recorded ones;
  the router still gets gradients through the recorded experts' weights.
  - R3 replays what the rollout engine recorded while sampling (`Rollout.routed_experts`).
  - R2 replays what the old-logprob forward chose (only differs from no replay when
    `algorithm.num_iterations > 1`: with one pass the old forward *is* the training forward).
- **Float32 router**: logits, softmax and top-k in float32 even when the model runs in bf16.
- **Load-balancing loss** (Switch Transformer, 2101.03961): per layer
  `E * sum_e f_e * P_e` over attended tokens, `f_e` the share of (token, slot) assignments to
  expert e times top_k and `P_e` the mean router probability; equal to top_k when perfectly
  balanced, mean over layers. The router probability is the family's own: the softmax of the
  logits, and for sigmoid-scored routers (DeepSeek-V3, `e_score_correction_bias`) the sigmoid
  scores normalised to sum 1 per token, `s'_e = s_e / sum_j s_j`, as in DeepSeek-V3's
  complementary sequence-wise balance loss (2412.19437, section 2.1.2, eqs. 17-20; there over
  each sequence and scaled so balance gives 1, here over the batch's tokens and giving top_k). Weighted by `moe.aux_loss_coef` (0 by default: RL peers found it
  hurts, and replayed routing should not be pushed around by it).
- **Expert-load metrics** under `moe/`: `moe/layer_{l}/expert_{e}/share` (share of the layer's
  token slots), `moe/layer_{l}/entropy` (entropy of the shares divided by log E: 1 = balanced),
  `moe/layer_{l}/max_share`, `moe/layer_{l}/min_share`.

Parallelism (what was checked, what was not): replay hooks act on the router module and so work
under DDP and FSDP2 (`fully_shard` per decoder layer keeps the router a normal submodule; checked
on CPU over gloo) and under DeepSpeed ZeRO-3 in principle (parameters are gathered before the
module's forward, hooks run after; not run here: deepspeed is not installed). transformers'
expert parallelism (`distributed_config` / `tp_plan` with `"ep"`) replaces the experts module's
forward with a sharded one that still consumes the router's indices, so replay composes with it
by construction, but it is untested here (needs several GPUs); FSDP2 + EP together is not
supported by transformers 5.24 for training, as far as we know, and is refused nowhere: don't.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from grpo.config import MoEConfig
from rollout.base import find_routers


def _normalises(router: torch.nn.Module) -> bool:
    # Qwen3-MoE / Qwen2-MoE / OLMoE / DeepSeek-V3 carry `norm_topk_prob`; Mixtral always renormalises;
    # DeepSeek-V2's router (it has `routed_scaling_factor` and no `norm_topk_prob`) never does.
    return getattr(router, "norm_topk_prob", not hasattr(router, "routed_scaling_factor"))


def _sigmoid_scored(router: torch.nn.Module) -> bool:
    # DeepSeek-V3-style routers score experts with a sigmoid and choose with a bias-corrected,
    # group-limited top-k; their weights are the sigmoid scores of the chosen experts.
    return hasattr(router, "e_score_correction_bias")


def _plain_topk(router: torch.nn.Module) -> bool:
    """The router picks the top-k of its softmax (not group-limited, no score correction)."""
    return not _sigmoid_scored(router) and getattr(router, "topk_method", "greedy") == "greedy"


def router_probabilities(router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """[T, E] probabilities a router gives each expert, for the load-balancing loss: the softmax of
    the logits, or for a sigmoid-scored router (DeepSeek-V3) the sigmoid scores normalised to sum 1
    per token (DeepSeek-V3, 2412.19437, eq. 19). The score correction bias only steers the choice
    and is left out, as there."""
    if _sigmoid_scored(router):
        scores = logits.float().sigmoid()  # [T, E]
        return scores / scores.sum(-1, keepdim=True)
    return logits.softmax(-1)


def topk_weights(router: torch.nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The weights `router` gives the experts `indices` [T, k] from its `logits` [T, E], in float32,
    by the family's own formula: softmax (sigmoid for DeepSeek-V3-style) scores at the indices,
    renormalised where the family renormalises, times `routed_scaling_factor` where it has one."""
    scores = logits.float().sigmoid() if _sigmoid_scored(router) else F.softmax(logits, dim=-1, dtype=torch.float32)
    weights = scores.gather(-1, indices)  # [T, k]
    if _normalises(router):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if _sigmoid_scored(router) else 0.0))
    return weights * getattr(router, "routed_scaling_factor", 1.0)


@dataclass
class RoutingScope:
    """What one forward's routers did: used experts per layer and, for the aux loss, logits.

    Positions are those of the right-padded batch [B, S] the scope was opened for. A scope may
    span several forwards over other token layouts (shared prompts: `set_part` before each one,
    see `grpo.algo.logprobs.TokenPart`); replay, counts, the aux loss and `used_experts` then map
    every token back onto [B, S].
    """

    attention_mask: torch.Tensor | None  # [B, S] or None (all tokens count)
    replay: torch.Tensor | None = None  # [B, S, L, k] long: experts to use
    replay_valid: torch.Tensor | None = None  # [B, S] bool: positions that have a recording
    keep_logits: bool = False
    count: bool = True  # add this forward's routing to the expert-load metrics
    used: list[torch.Tensor] = field(default_factory=list)  # per router call [T, k]
    logits: list[torch.Tensor] = field(default_factory=list)  # per router call [T, E] (float32)
    parts: list = field(default_factory=list)  # per router call: the TokenPart it ran on (None: [B, S])
    layer_of: list[int] = field(default_factory=list)  # per router call: its MoE layer
    part: object = None  # the TokenPart of the forward now running (None: the [B, S] batch itself)

    def set_part(self, part) -> None:
        self.part = part

    def used_experts(self) -> torch.Tensor:
        """[T, L, k] experts that ran for every token of the forward (T = B * S)."""
        if not any(p is not None for p in self.parts):
            return torch.stack(self.used, dim=1)
        batch, width = self.attention_mask.shape
        full = self.used[0].new_zeros(batch * width, max(self.layer_of) + 1, self.used[0].shape[-1])  # [B*S, L, k]
        for used, part, layer in zip(self.used, self.parts, self.layer_of):
            full[part.dst, layer] = used[part.src]
        return full

    def token_weight(self, part=None) -> torch.Tensor | None:
        """[T] weight of every token of a forward (full-layout positions it stands for; None: all 1)."""
        if part is not None:
            return part.weight
        return None if self.attention_mask is None else self.attention_mask.reshape(-1).to(torch.float32)


class RouterControl:
    """Installs one hook per router; `scope(...)` turns on recording/replay for one forward."""

    def __init__(self, model: torch.nn.Module, cfg: MoEConfig):
        self.cfg = cfg
        self.routers = find_routers(model)
        self.num_experts = self.routers[0].num_experts if self.routers else 0
        self.top_k = self.routers[0].top_k if self.routers else 0
        self._layer = {id(r): i for i, r in enumerate(self.routers)}
        self._scope: RoutingScope | None = None
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        self._counts: torch.Tensor | None = None  # [L, E] slots per expert since the last metrics()

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- one forward -----------------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self, attention_mask: torch.Tensor | None = None, replay: torch.Tensor | None = None,
              replay_valid: torch.Tensor | None = None, keep_logits: bool = False, count: bool = True):
        """Record (and, with `replay`, impose) the routing of the forwards run inside."""
        if replay is not None and replay_valid is None:
            replay_valid = torch.ones(replay.shape[:2], dtype=torch.bool, device=replay.device)
        self._scope = RoutingScope(attention_mask, replay, replay_valid, keep_logits, count)
        try:
            yield self._scope
        finally:
            self._scope = None

    def _hook(self, module, args, output):
        scope = self._scope
        if scope is None and not self.cfg.router_float32:
            return None  # leave the model exactly as it is (e.g. the sampler without fp32 routers)
        hidden = args[0].reshape(-1, module.weight.shape[-1])  # [T, H]
        logits, weights, indices = output  # [T, E], [T, k], [T, k]
        if self.cfg.router_float32:
            logits = F.linear(hidden.float(), module.weight.float())  # [T, E]
        layer = self._layer[id(module)]
        part = scope.part if scope is not None else None
        if scope is not None and scope.replay is not None:
            recorded = scope.replay[:, :, layer].reshape(-1, indices.shape[-1]).to(indices.device)  # [B*S, k]
            valid = scope.replay_valid.reshape(-1, 1).to(indices.device)  # [B*S, 1]
            if part is not None:  # this forward's tokens stand for these full-layout positions
                recorded, valid = recorded[part.position], valid[part.position] & (part.weight[:, None] > 0)
            indices = torch.where(valid, recorded.to(indices.dtype), indices)  # [T, k]
        elif self.cfg.router_float32 and _plain_topk(module):  # (DeepSeek's routers choose in float32 already)
            indices = torch.topk(logits, indices.shape[-1], dim=-1).indices  # [T, k]; softmax keeps the order
        if self.cfg.router_float32 or (scope is not None and scope.replay is not None):
            weights = topk_weights(module, logits, indices)  # [T, k]
            if not self.cfg.router_float32:
                weights = weights.to(output[1].dtype)
        if scope is not None:
            scope.used.append(indices.detach())
            scope.parts.append(part)
            scope.layer_of.append(layer)
            if scope.keep_logits:
                scope.logits.append(logits.float())
            if scope.count:
                self._count(layer, indices.detach(), scope.token_weight(part))
        return logits, weights, indices

    def _count(self, layer: int, indices: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Add a forward's (token, slot) assignments; `weight` [T]: positions each token stands for."""
        if not self.cfg.metrics:
            return
        if self._counts is None:
            self._counts = torch.zeros(len(self.routers), self.num_experts, dtype=torch.float64)
        slot_weight = None
        if weight is not None:
            slot_weight = weight.to(indices.device, torch.float64)[:, None].expand(indices.shape).reshape(-1).cpu()
        self._counts[layer] += torch.bincount(indices.reshape(-1).cpu().long(), weights=slot_weight,
                                              minlength=self.num_experts).double()

    # -- losses and metrics ----------------------------------------------------------------

    def aux_loss(self, scope: RoutingScope) -> torch.Tensor | None:
        """Switch load-balancing loss of one scoped forward (needs `keep_logits=True`); tokens are
        weighted by the full-layout positions they stand for (1 each without shared prompts)."""
        if not scope.logits:
            return None
        calls = len(scope.logits)
        parts = scope.parts or [None] * calls  # a hand-built scope: one forward, one entry per layer
        layer_of = scope.layer_of or list(range(calls))
        sums: dict[int, list] = {}  # layer -> [weighted slot counts [E], weighted probabilities [E], weight]
        for logits, used, part, layer in zip(scope.logits, scope.used, parts, layer_of):
            weight = scope.token_weight(part)  # [T] or None
            weight = torch.ones(logits.shape[0], device=logits.device) if weight is None else weight.to(logits.device)
            probs = router_probabilities(self.routers[layer], logits)  # [T, E]
            slots = F.one_hot(used, self.num_experts).float().sum(1)  # [T, E] (k ones per token)
            acc = sums.setdefault(layer, [0.0, 0.0, 0.0])
            acc[0] = acc[0] + (weight[:, None] * slots).sum(0)
            acc[1] = acc[1] + (weight[:, None] * probs).sum(0)
            acc[2] = acc[2] + weight.sum()
        losses = []
        for f_sum, p_sum, w_sum in sums.values():
            f, p = f_sum / w_sum, p_sum / w_sum  # [E] summing to top_k, [E] summing to 1
            losses.append(self.num_experts * (f * p).sum())
        return torch.stack(losses).mean()

    def take_counts(self) -> torch.Tensor | None:
        """[L, E] expert slot counts since the last call (this process only), then reset."""
        counts, self._counts = self._counts, None
        return counts


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Expert-load metrics from [L, E] slot counts (summed over processes by the caller)."""
    metrics: dict[str, float] = {}
    num_experts = counts.shape[1]
    for layer, row in enumerate(counts):
        share = row / row.sum().clamp(min=1)  # [E]
        nz = share[share > 0]
        entropy = -(nz * nz.log()).sum().item() / math.log(num_experts) if num_experts > 1 else 1.0
        for e in range(num_experts):
            metrics[f"moe/layer_{layer}/expert_{e}/share"] = share[e].item()
        metrics[f"moe/layer_{layer}/entropy"] = entropy
        metrics[f"moe/layer_{layer}/max_share"] = share.max().item()
        metrics[f"moe/layer_{layer}/min_share"] = share.min().item()
    return metrics


def replay_from_rollouts(rollouts, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """R3 tensors for a right-padded batch of `width` positions: ([B, S, L, k] experts, [B, S] valid).

    A rollout records prompt + completion - 1 positions (the last token is never fed back); the
    positions without a recording (that last token, padding) keep the trainer's own routing,
    which only affects logits no log-probability reads.
    """
    records = [r.routed_experts for r in rollouts]
    if any(rec is None for rec in records):
        return None
    _, layers, k = records[0].shape
    experts = torch.zeros((len(records), width, layers, k), dtype=torch.long)
    valid = torch.zeros((len(records), width), dtype=torch.bool)
    for b, rec in enumerate(records):
        n = min(rec.shape[0], width)
        experts[b, :n] = rec[:n].long()
        valid[b, :n] = True
    return experts, valid
