"""The transformers rollout engine: batched sampling with a KV cache, on CPU or GPU.

All prompts x group size are decoded as one batch. The decode loop is written here rather than
calling `model.generate`, because on small models per-token framework overhead dominates:

- the prompt batch (left-padded once) is prefilled by the transformers model itself, so routing
  capture and every architecture transformers supports work unchanged; each distinct prompt is
  prefilled once and its cache copied to the group's rows (a group of n shares one prefill);
- decode steps then run through one of two steppers:
  * `_FastQwen3Stepper` for Qwen3 and Qwen3-MoE (the models this project ships and benchmarks): a
    decode-step forward written with the model's own parameters (no copies, so weight updates are
    seen at once) and a preallocated (static) KV buffer. It does what the transformers modules do
    for one new token per row, minus their per-call framework work (mask construction, output
    records, hooks, cache-object bookkeeping, dynamic KV concatenation). At decode batch sizes the
    MoE block evaluates every expert densely and weights the outputs with the router's top-k
    weights (exact: unselected experts get weight 0), which at a few dozen rows is cheaper than
    any sparse dispatch; above `dense_experts_max_rows` rows, or for MoE layers larger than
    `_FastQwen3Stepper.DENSE_EXPERTS_MAX_PARAMS`, it calls the model's own experts module
    (whatever `experts_implementation` is set);
  * `_GenericStepper` for everything else: the model's forward with a transformers cache and a
    preallocated attention mask.
- finished rows are dropped from the batch (and the cache); bookkeeping is tensor-side, with one
  host transfer at the end.

For every drawn token it records its log-probability under the distribution it was actually drawn
from (after temperature, top-k and top-p), which is what sampler-mismatch corrections need; tests
check the logprobs against a teacher-forced forward pass of the model to 1e-4.

For MoE models it can record the experts every token was routed to (forward hooks on the routers
during prefill; the fast stepper records its own top-k choices), for routing replay in the trainer.

CPU:  HFEngine(model, tokenizer).generate(prompt_ids, n=8, sampling=SamplingParams(32))
GPU:  the same, with the model on CUDA (bf16 works; logprobs are computed in float32).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout.base import Rollout, SamplingParams, find_routers


def sampling_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from.

    logits: [B, V] raw next-token logits. Returns [B, V] float32 log-probs after temperature,
    top-k and top-p (filtered tokens get -inf). With temperature 1 and no filtering this is the
    model's own log_softmax, so the sampler's logprobs equal a teacher-forced forward pass.
    """
    if sampling.temperature == 0.0:  # greedy: report the model's own log-probabilities
        return F.log_softmax(logits.float(), dim=-1)  # [B, V]
    scores = logits.float()
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature  # [B, V]
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_scores.softmax(-1)  # [B, V]
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p  # [B, V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        scores = scores.masked_fill(drop, float("-inf"))
    return F.log_softmax(scores, dim=-1)  # [B, V]


class RaceNoise:
    """Exponential(1) noise for the sampler's draws, several decode steps at a time.

    Each row's noise comes from its own generator when `row_generators` is given (one per batch
    row), so a completion does not depend on which other rows share the batch; otherwise from one
    shared generator. Noise for up to `MAX_BLOCK_BYTES` worth of [rows, steps, vocab] is drawn in
    one call per generator instead of one call per row and step.
    """

    MAX_BLOCK_BYTES = 16 * 2**20

    def __init__(self, batch: int, vocab: int, max_steps: int, device: torch.device, generator: torch.Generator,
                 row_generators: list[torch.Generator] | None = None):
        self.batch, self.vocab, self.device = batch, vocab, device
        self.generator, self.row_generators = generator, row_generators
        self.block = max(1, min(max_steps, self.MAX_BLOCK_BYTES // (4 * batch * vocab)))
        self.noise: torch.Tensor | None = None  # [B, block, V]
        self.used = self.block

    def next(self, alive: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Noise of the current step for the rows in `alive` (None: all rows): [A, V]."""
        if self.used == self.block:
            shape = (self.block, self.vocab)
            if self.row_generators is None:
                self.noise = torch.empty((self.batch, *shape), dtype=dtype, device=self.device).exponential_(
                    1.0, generator=self.generator)
            else:
                self.noise = torch.stack([torch.empty(shape, dtype=dtype, device=self.device).exponential_(
                    1.0, generator=g) for g in self.row_generators])  # [B, block, V]
            self.used = 0
        step = self.noise[:, self.used]  # [B, V]
        self.used += 1
        return step if alive is None else step[alive]


def draw(logprobs: torch.Tensor, sampling: SamplingParams, noise: RaceNoise | None = None,
         alive: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from [B, V] log-probs: argmax when greedy, else a categorical draw.

    The draw is argmax(p / E) with E ~ Exponential(1) i.i.d. per entry (`noise`), which picks
    token i with probability p_i (the exponential-race form of the Gumbel-max trick) and needs no
    host sync. `alive` maps the current rows to the batch rows the noise was made for. Returns
    [B] token ids.
    """
    if sampling.temperature == 0.0:
        return logprobs.argmax(-1)  # [B]
    probs = logprobs.exp()  # [B, V]
    return (probs / noise.next(alive, probs.dtype)).argmax(-1)  # [B]


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


class _StopChecker:
    """Decides, after each drawn token, which rows have finished.

    Stop ids (EOS unless ignored, `stop_token_ids`, and stop strings that are exactly one token)
    are checked on the device with one `isin`. Longer stop strings are matched against the decoded
    tail of each live row, bounded by the stop string's length in characters (a token decodes to at
    least one character); only done when such strings exist.
    """

    def __init__(self, tokenizer, sampling: SamplingParams, device: torch.device):
        self.tokenizer = tokenizer
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos and tokenizer.eos_token_id is not None:
            stop_ids.add(tokenizer.eos_token_id)
        self.text_stops: list[str] = []
        for stop in sampling.stop:
            ids = tokenizer.encode(stop, add_special_tokens=False)
            if len(ids) == 1 and tokenizer.decode(ids) == stop:
                stop_ids.add(ids[0])
            else:
                self.text_stops.append(stop)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device) if stop_ids else None
        self.tail_tokens = max((len(s) for s in self.text_stops), default=0)
        self.active = self.stop_ids is not None or bool(self.text_stops)

    def finished(self, token: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor, t: int) -> torch.Tensor:
        """token: [A] just drawn; tokens: [B, N] completions so far (column t holds `token`).
        Returns [A] bool."""
        done = torch.isin(token, self.stop_ids) if self.stop_ids is not None else torch.zeros_like(token, dtype=torch.bool)
        if self.text_stops:
            tails = tokens[alive, max(0, t + 1 - self.tail_tokens) : t + 1].tolist()  # [A, <=tail]
            text_done = [any(s in self.tokenizer.decode(tail, skip_special_tokens=False) for s in self.text_stops)
                         for tail in tails]
            done = done | torch.tensor(text_done, dtype=torch.bool, device=done.device)
        return done


# --- steppers: one decode step for the rows still alive -------------------------------------------


@functools.cache
def _cache_keyword_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The name of the KV-cache argument (and output field) of a transformers model's forward:
    `cache` in transformers >= 5.20, `past_key_values` before (vLLM's CPU build pins 5.19)."""
    return _cache_keyword_of(type(model))


def output_cache(out):
    """The KV cache a transformers forward returned, under either name."""
    return out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (a ModelOutput)


def _prefill(model, input_ids, attention, positions, record: bool):
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


class _GenericStepper:
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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as transformers' Qwen3 computes it (float32 statistics,
    cast back, then weight). `weight` is [D] or broadcastable to x ([heads, D] for per-head norms)."""
    xf = x.float()  # no copy for float32
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _FastQwen3Stepper:
    """Decode steps for Qwen3 / Qwen3-MoE written with the model's own parameters.

    Per layer, for one new token per row: RMSNorm -> q/k/v projections -> per-head q/k RMSNorm ->
    rotary embedding -> write k/v into a preallocated [A, kv_heads, W+N, head_dim] buffer ->
    scaled-dot-product attention over the valid positions (GQA) -> output projection -> residual
    -> RMSNorm -> MoE (router softmax, top-k, optional renormalisation; experts) or dense MLP ->
    residual: the operations of the transformers modules, in their order.

    To keep the number of kernel launches per step low, a few weights are laid out once per
    `generate` call (fused q/k/v rows; router rows stacked on the experts' gate/up rows; the
    experts' down projections side by side; a dense MLP's gate and up rows), so a dense-experts
    MoE block is two matmuls. On CPU every weight the step multiplies by is also copied as
    [in, out] (`x @ W` beats `F.linear` at a few dozen rows). These are copies made at the start
    of each call, so they always reflect the current weights.
    """

    SUPPORTED = ("qwen3_moe", "qwen3")
    DENSE_EXPERTS_MAX_PARAMS = 16 * 2**20  # per MoE layer; above it, no dense path and no weight copies
    TRANSPOSED_MAX_BYTES = 2**30  # CPU only: models up to this size get [in, out] weight copies per call

    @classmethod
    def supports(cls, model) -> bool:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in cls.SUPPORTED or getattr(cfg, "hidden_act", None) != "silu":
            return False
        try:
            layers = model.model.layers
        except AttributeError:
            return False
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or getattr(attn, "sliding_window", None) or not hasattr(attn, "q_norm"):
                return False
            if any(getattr(getattr(attn, n), "bias", None) is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                return False
            mlp = layer.mlp
            moe = hasattr(mlp, "experts") and hasattr(mlp, "gate")
            if moe and (getattr(mlp.experts, "gate_up_proj", None) is None or getattr(mlp.experts, "has_bias", False)
                        or getattr(mlp.experts, "is_transposed", False)
                        or not getattr(mlp.experts, "is_concatenated", True)):
                return False
            if not moe and not hasattr(mlp, "gate_proj"):
                return False
        return True

    def __init__(self, model, cache, attention: torch.Tensor, positions: torch.Tensor, max_new: int,
                 record: bool, dense_experts_max_rows: int = 64):
        self.model, self.record = model, record
        self.dense_experts_max_rows = dense_experts_max_rows
        inner = model.model
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        batch, width = attention.shape
        self.width, self.steps = width, 0
        first = inner.layers[0].self_attn
        self.head_dim = hd = first.head_dim
        self.scaling = first.scaling
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        device = attention.device
        # On CPU, x @ W with W laid out [in, out] runs 1.5-3.5x faster than F.linear(x, W[out, in])
        # at decode row counts (measured on this project's 2-core machine), so the step's weights
        # are copied once per call in that layout while they fit TRANSPOSED_MAX_BYTES.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.transposed = device.type == "cpu" and weight_bytes <= self.TRANSPOSED_MAX_BYTES
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = self._layout(model.lm_head.weight)
        self.layers = [self._plan(layer) for layer in inner.layers]
        # Rotary table for every position any row can reach; rows index it by their own position.
        table_pos = torch.arange(width + max_new, device=device)[None]  # [1, W+N]
        cos, sin = inner.rotary_emb(self.embed[:1], table_pos)  # [1, W+N, hd] each
        self.cos, self.sin = cos[0], sin[0]  # [W+N, hd]
        self.next_pos = positions[:, -1] + 1  # [B]
        # rotate_half(x) == x @ rot: [-x2, x1] as one small matmul
        half = hd // 2
        rot = torch.zeros(hd, hd, dtype=self.embed.dtype, device=device)
        rot[half:, :half] = -torch.eye(half, dtype=rot.dtype, device=device)
        rot[:half, half:] = torch.eye(half, dtype=rot.dtype, device=device)
        self.rot = rot
        # Static KV buffers, prompt part copied from the prefill cache.
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values  # [B, kvh, W, hd]
            kb = k.new_empty(batch, k.shape[1], width + max_new, k.shape[3])
            vb = v.new_empty(batch, v.shape[1], width + max_new, v.shape[3])
            kb[:, :, :width] = k
            vb[:, :, :width] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.valid = torch.zeros(batch, width + max_new, dtype=torch.bool, device=device)  # [B, W+N]
        self.valid[:, :width] = attention.bool()

    def _layout(self, *weights: torch.Tensor) -> torch.Tensor:
        """Linear weights [out_i, in] stacked along out, in the layout `_linear` takes: [sum out_i, in],
        or its [in, sum out_i] transpose when transposed (one copy either way; a single weight
        that needs no copy is returned as is)."""
        if self.transposed:
            return torch.cat([w.t() for w in weights], dim=1) if len(weights) > 1 else weights[0].t().contiguous()
        return torch.cat(weights) if len(weights) > 1 else weights[0]

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.transposed else F.linear(x, weight)

    def _plan(self, layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        plan = {
            "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
            "qkv": self._layout(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),  # [(h+2kvh)*hd, H]
            "qk_norm": torch.cat([attn.q_norm.weight.expand(self.heads, -1),
                                  attn.k_norm.weight.expand(self.kv_heads, -1)]),  # [h+kvh, hd]
            "o": self._layout(attn.o_proj.weight),
        }
        if hasattr(mlp, "experts"):
            experts, gate = mlp.experts, mlp.gate
            num, inter2, hidden = experts.gate_up_proj.shape
            plan.update(moe=mlp, top_k=gate.top_k, norm_topk=gate.norm_topk_prob, num_experts=num,
                        router=self._layout(gate.weight), dense=False)
            # Dense evaluation (and its per-call weight copies) only for small expert tensors; large
            # MoE layers always go through the model's own (sparse) experts kernel.
            if experts.gate_up_proj.numel() + experts.down_proj.numel() <= self.DENSE_EXPERTS_MAX_PARAMS:
                plan.update(
                    dense=True,
                    # router rows first, then every expert's [gate; up] rows: [E + E*2I, H]
                    router_gate_up=self._layout(gate.weight, experts.gate_up_proj.reshape(num * inter2, hidden)),
                    # every expert's down projection side by side: [H, E*I] ([E*I, H] when transposed)
                    down=(experts.down_proj.transpose(1, 2).reshape(-1, hidden) if self.transposed
                          else experts.down_proj.permute(1, 0, 2).reshape(hidden, -1)),
                )
        elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and not any(
                getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            # dense SwiGLU MLP: [gate; up] as one product, then down
            plan.update(gate_up=self._layout(mlp.gate_proj.weight, mlp.up_proj.weight),
                        mlp_down=self._layout(mlp.down_proj.weight))
        else:
            plan["mlp"] = mlp
        return plan

    def select(self, keep: torch.Tensor) -> None:
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.valid, self.next_pos = self.valid[keep], self.next_pos[keep]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, weight, self.eps)

    def _attention(self, i: int, p: dict, x: torch.Tensor, cos, sin, slot: int) -> torch.Tensor:
        rows, h, kvh = x.shape[0], self.heads, self.kv_heads
        qkv = self._linear(x, p["qkv"]).view(rows, h + 2 * kvh, self.head_dim)  # [A, h+2kvh, hd]
        qk = self._norm(qkv[:, : h + kvh], p["qk_norm"])  # [A, h+kvh, hd]
        qk = qk * cos + torch.matmul(qk, self.rot) * sin  # rotary embedding
        q = qk[:, :h].unsqueeze(2)  # [A, h, 1, hd]
        self.keys[i][:, :, slot] = qk[:, h:]
        self.values[i][:, :, slot] = qkv[:, h + kvh :]
        span = slot + 1
        out = F.scaled_dot_product_attention(q, self.keys[i][:, :, :span], self.values[i][:, :, :span],
                                             attn_mask=self.valid[:, None, None, :span], scale=self.scaling,
                                             enable_gqa=True)  # [A, h, 1, hd]
        return self._linear(out.reshape(rows, -1), p["o"])  # [A, H]

    def _moe(self, p: dict, x: torch.Tensor):
        rows, num = x.shape[0], p["num_experts"]
        sparse = not p["dense"] or rows > self.dense_experts_max_rows
        if sparse:  # the model's own experts kernel
            router_logits = self._linear(x, p["router"])  # [A, E]
        else:
            fused = self._linear(x, p["router_gate_up"])  # [A, E + E*2I]
            router_logits = fused[:, :num]  # [A, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # [A, E]
        top_w, top_i = torch.topk(probs, p["top_k"], dim=-1)  # [A, k]
        if p["norm_topk"]:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(x.dtype)
        if sparse:
            return p["moe"].experts(x, top_i, top_w), top_i
        weights = torch.zeros_like(router_logits).scatter_(1, top_i, top_w)  # [A, E], 0 off the top-k
        gate_up = fused[:, num:].view(rows, num, -1)  # [A, E, 2I]
        g, u = gate_up.chunk(2, dim=-1)  # [A, E, I] each
        act = F.silu(g) * u * weights.unsqueeze(-1)  # [A, E, I]
        return self._linear(act.reshape(rows, -1), p["down"]), top_i  # [A, H], [A, k]

    def step(self, token: torch.Tensor):
        """token: [A]. Returns logits [A, V] and routes [A, L, k] (int16) or None."""
        slot = self.width + self.steps
        self.steps += 1
        self.valid[:, slot] = True
        cos = self.cos[self.next_pos][:, None, :]  # [A, 1, hd]
        sin = self.sin[self.next_pos][:, None, :]
        h = F.embedding(token, self.embed)  # [A, H]
        routes = []
        for i, p in enumerate(self.layers):
            h = h + self._attention(i, p, self._norm(h, p["ln1"]), cos, sin, slot)
            x = self._norm(h, p["ln2"])
            if "moe" in p:
                y, top_i = self._moe(p, x)
                routes.append(top_i)
            elif "gate_up" in p:
                g, u = self._linear(x, p["gate_up"]).chunk(2, dim=-1)  # [A, I] each
                y = self._linear(F.silu(g) * u, p["mlp_down"])  # [A, H]
            else:
                y = p["mlp"](x)
            h = h + y
        logits = self._linear(self._norm(h, self.final_norm), self.lm_head)  # [A, V]
        self.next_pos = self.next_pos + 1
        recorded = torch.stack(routes, dim=1).to(torch.int16) if self.record and routes else None  # [A, L, k]
        return logits, recorded


class HFEngine:
    """Rollout engine over a transformers causal LM (the policy itself when colocated on CPU).

    Args:
        model, tokenizer: the policy and its tokenizer.
        device: where decoding runs (default: the model's device).
        fast_decode: use the hand-written decode step for Qwen3 / Qwen3-MoE when the model is one
            (`_FastQwen3Stepper.supports`); False always uses the model's own forward.
        dense_experts_max_rows: in the fast path, MoE blocks evaluate all experts densely while at
            most this many rows decode, and call the model's experts module above it.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                 fast_decode: bool = True, dense_experts_max_rows: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.fast_decode = fast_decode and _FastQwen3Stepper.supports(model)
        self.dense_experts_max_rows = dense_experts_max_rows

    # -- Protocol ------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams
    ) -> list[Rollout]:
        rows = [list(p) for p in prompts for _ in range(n)]
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        if sampling.prompt_seeds and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        row_seeds = ([sampling.prompt_seeds[b // n] * 1_000_003 + b % n for b in range(len(rows))]
                     if sampling.prompt_seeds else None)
        completions, logprobs, reasons, routing = self._decode(rows, sampling, row_seeds)
        out = []
        for b, (prompt, completion) in enumerate(zip(rows, completions)):
            out.append(
                Rollout(
                    group=b // n,
                    prompt_ids=tuple(prompt),
                    completion_ids=tuple(completion),
                    text=self.tokenizer.decode(completion, skip_special_tokens=True),
                    logprobs=tuple(logprobs[b]),
                    finish_reason=reasons[b],
                    routed_experts=routing[b] if routing is not None else None,
                )
            )
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights in; tensors that already are this model's parameters are skipped."""
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = own[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor.to(target.device, target.dtype))

    def before_update(self) -> None:
        """Nothing to release: the engine decodes with the policy module (or its own copy)."""

    def after_update(self) -> None:
        """Nothing to take back."""

    def close(self) -> None:
        self.model = None

    # -- decoding ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode(self, rows: list[list[int]], sampling: SamplingParams, row_seeds: list[int] | None = None):
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._decode_eval(rows, sampling, row_seeds)
        finally:
            model.train(was_training)

    def _decode_eval(self, rows: list[list[int]], sampling: SamplingParams, row_seeds: list[int] | None = None):
        device = self.device
        generator = torch.Generator(device=device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        row_generators = ([torch.Generator(device=device).manual_seed(s) for s in row_seeds]
                          if row_seeds is not None else None)
        batch, max_new, record = len(rows), sampling.max_new_tokens, sampling.record_routing
        width = max(map(len, rows))
        logits, cache, attention, positions, prefill_routes = self._prefill_distinct(rows, width, record)
        stepper_cls = _FastQwen3Stepper if self.fast_decode else _GenericStepper
        kwargs = {"dense_experts_max_rows": self.dense_experts_max_rows} if self.fast_decode else {}
        stepper = stepper_cls(self.model, cache, attention, positions, max_new, record, **kwargs)
        del cache
        out = _Decoded.empty(batch, max_new, self.pad_id, device, prefill_routes.shape[2:] if record else None)
        noise = RaceNoise(batch, logits.shape[-1], max_new, device, generator, row_generators)
        _sample_tokens(stepper, logits, sampling, _StopChecker(self.tokenizer, sampling, device), noise, out)
        return out.results(rows, width, prefill_routes)

    def _prefill_distinct(self, rows: list[list[int]], width: int, record: bool):
        """Prefill each distinct prompt once (a group's n rows share it), then copy the cache, the
        last logits and the routing record out to the rows: (logits, cache, attention, positions,
        prefill routes), all [B, ...]."""
        device = self.device
        distinct: dict[tuple[int, ...], int] = {}
        row_of = torch.tensor([distinct.setdefault(tuple(row), len(distinct)) for row in rows], device=device)  # [B]
        input_ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long)  # [P, W]
        attention = torch.zeros((len(distinct), width), dtype=torch.long)  # [P, W]
        for p, row in enumerate(distinct):  # left padding keeps every row's last token at column -1
            input_ids[p, width - len(row) :] = torch.tensor(row)
            attention[p, width - len(row) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [P, W]
        logits, cache, prefill_routes = _prefill(self.model, input_ids, attention, positions, record)
        if len(distinct) < len(rows):  # one prefill row per distinct prompt -> one per decode row
            logits, attention, positions = logits[row_of], attention[row_of], positions[row_of]  # [B, ...]
            prefill_routes = prefill_routes[row_of] if prefill_routes is not None else None
            cache.reorder_cache(row_of)
        return logits, cache, attention, positions, prefill_routes


@dataclass
class _Decoded:
    """What decoding writes, per row: tokens and their log-probs [B, N], lengths and whether a stop
    ended the row [B], and the experts each decoded token was routed to [B, N, L, k] (if recorded)."""

    tokens: torch.Tensor
    token_lps: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    routes: torch.Tensor | None

    @classmethod
    def empty(cls, batch: int, max_new: int, pad_id: int, device, route_shape) -> _Decoded:
        routes = None
        if route_shape is not None:
            routes = torch.full((batch, max_new, *route_shape), -1, dtype=torch.int16, device=device)  # [B, N, L, k]
        return cls(torch.full((batch, max_new), pad_id, dtype=torch.long, device=device),  # [B, N]
                   torch.zeros((batch, max_new), dtype=torch.float32, device=device),  # [B, N]
                   torch.full((batch,), max_new, dtype=torch.long, device=device),  # [B]
                   torch.zeros(batch, dtype=torch.bool, device=device), routes)  # [B]

    def results(self, rows: list[list[int]], width: int, prefill_routes: torch.Tensor | None):
        """(completions, logprobs, finish reasons, routing) as lists, one entry per row."""
        batch = len(rows)
        lengths = self.lengths.tolist()
        tokens, lps = self.tokens.tolist(), self.token_lps.tolist()
        completions = [tokens[b][: lengths[b]] for b in range(batch)]
        logprobs = [lps[b][: lengths[b]] for b in range(batch)]
        reasons = ["stop" if s else "length" for s in self.stopped.tolist()]
        routing = None
        if self.routes is not None:
            # The last drawn token of each row was never fed back, so it has no routing:
            # (prompt + completion - 1) rows, the positions a training forward scores.
            prefill_routes, routes = prefill_routes.cpu(), self.routes.cpu()
            routing = [torch.cat([prefill_routes[b, width - len(rows[b]) :], routes[b, : lengths[b] - 1]])
                       for b in range(batch)]
        return completions, logprobs, reasons, routing


def _sample_tokens(stepper, logits: torch.Tensor, sampling: SamplingParams, stopper: _StopChecker,
                   noise: RaceNoise, out: _Decoded) -> None:
    """The decode loop: draw a token per live row, record it, drop the rows that stopped, step."""
    batch, max_new = out.tokens.shape
    alive = torch.arange(batch, device=out.tokens.device)  # rows still decoding, as indices into the batch
    all_alive = True  # while no row has finished, index with slices instead of `alive`
    for t in range(max_new):
        lp = sampling_logprobs(logits, sampling)  # [A, V]
        token = draw(lp, sampling, noise, None if all_alive else alive)  # [A]
        token_lp = lp.gather(-1, token[:, None]).squeeze(-1)  # [A]
        if all_alive:
            out.tokens[:, t], out.token_lps[:, t] = token, token_lp
        else:
            out.tokens[alive, t], out.token_lps[alive, t] = token, token_lp
        if stopper.active:
            done = stopper.finished(token, out.tokens, alive, t)  # [A]
            if bool(done.any()):
                finished = alive[done]
                out.lengths[finished] = t + 1
                out.stopped[finished] = True
                keep = (~done).nonzero().squeeze(-1)  # [A']
                if keep.numel() == 0:
                    break
                alive, token, all_alive = alive[keep], token[keep], False
                stepper.select(keep)
        if t == max_new - 1:
            break
        logits, step_routes = stepper.step(token)
        if out.routes is not None:
            if all_alive:
                out.routes[:, t] = step_routes
            else:
                out.routes[alive, t] = step_routes
