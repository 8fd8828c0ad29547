"""The hand-written decode step of Qwen3 and Qwen3-MoE (the models this project ships and benchmarks).

`FastQwen3Stepper` is a decode-step forward written with the model's own parameters (no copies, so
weight updates are seen at once) and a preallocated (static) KV buffer. It does what the transformers
modules do for one new token per row, minus their per-call framework work (mask construction, output
records, hooks, cache-object bookkeeping, dynamic KV concatenation). At decode batch sizes the MoE
block evaluates every expert densely and weights the outputs with the router's top-k weights (exact:
unselected experts get weight 0), which at a few dozen rows is cheaper than any sparse dispatch;
on CPU, when the rows' top-k choices are a small share of the experts (up to three rows of a
top-2-of-8 model: the long tail of a batch whose completions have spread lengths), it runs only
the chosen experts, each once, and never reads the others' weights; above `dense_experts_max_rows` rows, or
for MoE layers larger than
`FastQwen3Stepper.DENSE_EXPERTS_MAX_PARAMS`, it calls the model's own experts module (whatever
`experts_implementation` is set).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _base_of(model):
    """The transformers model inside a peft model (LoRA), else the model itself."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as transformers' Qwen3 computes it (float32 statistics,
    cast back, then weight). `weight` is [D] or broadcastable to x ([heads, D] for per-head norms)."""
    if x.dtype == torch.float32:  # the same arithmetic as one operation (a decode step runs dozens)
        if weight.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return weight * F.rms_norm(x, (x.shape[-1],), None, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _row_product(weight: torch.Tensor, row: torch.Tensor, halves: torch.Tensor | None = None,
                 column: torch.Tensor | None = None) -> torch.Tensor:
    """One row [1, in] times a weight [out, in] (CPU): [1, out]. With an even `out`, as one batched
    product over the weight's two halves of rows, which torch's CPU `bmm` runs on two threads: each
    core streams half of the weight. A single-row product (x @ W[in, out], or W @ x^T) runs on one
    thread and reads the weight at about half the memory bandwidth (measured on this project's
    2-core machine, weights not in cache: 27 µs against 52-69 for 0.5 MB, 147-170 against 245-477
    for 4 MB). `halves` (`_halves(weight)`) and `column` (`_column(row)`) may be passed in when
    made once for several products (a decode step is bound by the number of operations it runs)."""
    if halves is None:
        if weight.shape[0] % 2:
            return torch.mm(row, weight.t())
        halves = _halves(weight)
    return torch.bmm(halves, _column(row) if column is None else column).view(1, -1)


def _halves(weight: torch.Tensor) -> torch.Tensor | None:
    """A weight [..., out, in] as its two halves of rows [..., 2, out/2, in] (a view), or None for an odd `out`."""
    out = weight.shape[-2]
    return None if out % 2 else weight.unflatten(-2, (2, out // 2))


def _expert_halves(stacked: torch.Tensor) -> tuple:
    """Stacked expert weights [E, out, in] as each expert's `_halves` (views; Nones for an odd `out`)."""
    halves = _halves(stacked)  # [E, 2, out/2, in]
    return (None,) * stacked.shape[0] if halves is None else halves.unbind(0)


def _column(row: torch.Tensor) -> torch.Tensor:
    """One row [1, in] as the right-hand side of `_row_product`'s batched product: [2, in, 1] (a view)."""
    return row.t().expand(2, -1, 1)


@functools.cache
def _onednn_products() -> bool:
    """Whether this torch build runs oneDNN's linear on a prepacked float32 weight (the internal ops
    torch's own CPU compiler uses), checked once against a plain product."""
    try:  # (fixed values: the probe leaves the global random generator alone)
        weight = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32).remainder_(7).sub_(3)
        x = torch.arange(4 * 32, dtype=torch.float32).reshape(4, 32).remainder_(5).sub_(2)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
        return torch.backends.mkldnn.is_available() and torch.allclose(out, x @ weight.t(), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


class _Product:
    """A linear weight on CPU, multiplied the way that is fastest at its row count (measured on this
    project's 2-core machine, weights larger than the cache, where MKL's small-matrix kernels read
    a weight at a fraction of the memory bandwidth):
    - one row: `_row_product` (both cores stream half of the weight each);
    - 2 to 3 rows, and small weights: (W[out, in] @ x^T)^T, 2-3x faster there than x @ W[in, out]
      or F.linear; 9 to 15 rows are zero-padded to 16, where that kernel is faster;
    - from PACKED_MIN_ROWS rows, weights of PACKED_MIN_BYTES or more (a MoE layer's stacked experts):
      oneDNN's linear on a copy of the weight in its own blocked layout, made on first use (per
      decode step of the bench's small model within spread-length generates, 16 rows: 7.3-8.2 ms
      against 9.1-11.0; 8 rows 5.8-6.3 against 7.4-8.1). At 2-3 rows it was slower than the plain
      product.
    """

    PACKED_MIN_ROWS = 4
    PACKED_MIN_BYTES = 2**20
    __slots__ = ("out_in", "halves", "_packable", "_packed")

    def __init__(self, out_in: torch.Tensor):
        self.out_in, self._packed = out_in, None  # [out, in]; the oneDNN copy
        self.halves = _halves(out_in)  # [2, out/2, in] (a view) or None
        self._packable = (out_in.dtype == torch.float32 and _onednn_products()
                          and out_in.numel() * out_in.element_size() >= self.PACKED_MIN_BYTES)

    def __call__(self, x: torch.Tensor, column: torch.Tensor | None = None) -> torch.Tensor:
        """x [A, in] times the weight: [A, out]. `column`: one row's `_column(x)`, when already made."""
        rows = x.shape[0]
        if rows == 1:
            return _row_product(self.out_in, x, self.halves, column)
        if self._packable and rows >= self.PACKED_MIN_ROWS:
            if self._packed is None:
                self._packed = self._pack()
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [None], "")  # [A, out]
        if 8 < rows < 16:  # zero rows up to 16: the kernel is faster there than at 9-15 rows
            x = torch.cat([x, x.new_zeros(16 - rows, x.shape[1])])  # [16, in]
        elif not x.is_contiguous():
            x = x.contiguous()
        return torch.mm(self.out_in, x.t())[:, :rows].t().contiguous()  # [A, out]

    def _pack(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout for products of up to 16 rows."""
        return torch.ops.mkldnn._reorder_linear_weight(self.out_in, 16)


class FastQwen3Stepper:
    """Decode steps for Qwen3 / Qwen3-MoE written with the model's own parameters.

    Per layer, for one new token per row: RMSNorm -> q/k/v projections -> per-head q/k RMSNorm ->
    rotary embedding -> write k/v into a preallocated [A, kv_heads, W+N, head_dim] buffer ->
    scaled-dot-product attention over the valid positions (GQA) -> output projection -> residual
    -> RMSNorm -> MoE (router softmax, top-k, optional renormalisation; experts) or dense MLP ->
    residual: the operations of the transformers modules, in their order.

    To keep the number of kernel launches per step low, a few weights are laid out once per
    `generate` call (fused q/k/v rows; the experts' down projections side by side; a dense MLP's
    gate and up rows; the experts' gate/up rows are a view), so a dense-experts MoE block is three
    matmuls (router, every expert's gate/up, every expert's down). On CPU each product runs in the
    way that is fastest for its row count (`_Product`, whose oneDNN copies of large weights are
    made on first use). The copies are made during each call,
    so they always reflect the current weights; the router is not stacked on the experts' rows,
    since that copy (the size of the experts) cost more per call than the product it saved.
    """

    SUPPORTED = ("qwen3_moe", "qwen3")
    DENSE_EXPERTS_MAX_PARAMS = 16 * 2**20  # per MoE layer; above it, no dense path and no weight copies
    PRODUCT_COPIES_MAX_BYTES = 2**30  # CPU only: models up to this size get `_Product`s (and their copies) per call
    # CPU: rows whose top-k choices number at most this share of a layer's experts run only the
    # chosen experts (`_chosen_experts`). Measured here (8 experts, top-2, hidden 512, 8 layers):
    # one row 3.3-4.1 ms per step against 4.9-5.9 dense; two and three rows (each chosen expert
    # once, on all rows), within spread-length generates, 5.9-6.9 against 6.7-7.5 and 7.5-8.1
    # against 9.1-9.7 (a busy machine). Only measured with 8 experts.
    CHOSEN_EXPERTS_MAX_SHARE = 0.75

    # the linear layers whose weights the step reads, by attribute name: LoRA adapters on these are
    # folded into the step's weights (`_weight`); an adapter anywhere else (experts, router, head)
    # leaves decoding to the layers' own forwards
    ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @classmethod
    def supports(cls, model) -> bool:
        model = _base_of(model)
        cfg = model.config
        for name, m in model.named_modules():
            if hasattr(m, "lora_A") and (name.rsplit(".", 1)[-1] not in cls.ADAPTABLE
                                         or not isinstance(getattr(m, "base_layer", None), torch.nn.Linear)):
                return False
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
        model = _base_of(model)
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
        # On CPU, products run through `_Product` (the kernel fastest for the row count, measured on
        # this project's 2-core machine), whose weight copies are made while they fit PRODUCT_COPIES_MAX_BYTES.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.cpu_products = device.type == "cpu" and weight_bytes <= self.PRODUCT_COPIES_MAX_BYTES
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
        # Additive attention mask [B, W+N]: -inf at the prompts' padding, 0 elsewhere (every decoded
        # position is valid once written, and a step reads only the positions written so far), in
        # the form SDPA would turn a boolean mask into on every call of every layer.
        self.bias = torch.zeros(batch, width + max_new, dtype=self.embed.dtype, device=device)
        self.bias[:, :width].masked_fill_(~attention.bool(), float("-inf"))

    def _layout(self, *weights: torch.Tensor):
        """Linear weights [out_i, in] stacked along out (one copy; a single weight is used as is), in
        the form `_linear` takes: the [sum out_i, in] tensor, or on CPU a `_Product` of it."""
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]  # [sum out_i, in]
        return _Product(stacked.contiguous()) if self.cpu_products else stacked

    @staticmethod
    def _weight(linear) -> torch.Tensor:
        """A linear layer's weight as its forward applies it: with LoRA adapters (peft's `lora.Linear`),
        the base weight plus each active, unmerged adapter's scale * B A (a new tensor)."""
        if not hasattr(linear, "lora_A"):
            return linear.weight
        weight = linear.get_base_layer().weight
        if linear.merged or linear.disable_adapters:
            return weight
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
        return weight

    def _linear(self, x: torch.Tensor, weight, column: torch.Tensor | None = None) -> torch.Tensor:
        """x [A, in] times a weight of `_layout`: [A, out] (`column`: see `_Product`)."""
        return weight(x, column) if self.cpu_products else F.linear(x, weight)

    def _plan(self, layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        plan = {
            "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
            "qkv": self._layout(*(self._weight(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))),  # [(h+2kvh)*hd, H]
            "qk_norm": torch.cat([attn.q_norm.weight.expand(self.heads, -1),
                                  attn.k_norm.weight.expand(self.kv_heads, -1)]),  # [h+kvh, hd]
            "o": self._layout(self._weight(attn.o_proj)),
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
                    # every expert's [gate; up] rows: [E*2I, H] (a view of the experts' weights)
                    experts_gate_up=self._layout(experts.gate_up_proj.reshape(num * inter2, hidden)),
                    # every expert's down projection side by side: [H, E*I]
                    down=self._layout(experts.down_proj.permute(1, 0, 2).reshape(hidden, -1)),
                )
                if self.cpu_products:  # each expert's weights, as `_chosen_experts` multiplies them (views)
                    gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
                    plan.update(chosen_gate_up=gate_up.unbind(0), chosen_down=down.unbind(0),
                                gate_up_halves=_expert_halves(gate_up), down_halves=_expert_halves(down))
        elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and not any(
                getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            # dense SwiGLU MLP: [gate; up] as one product, then down
            plan.update(gate_up=self._layout(self._weight(mlp.gate_proj), self._weight(mlp.up_proj)),
                        mlp_down=self._layout(self._weight(mlp.down_proj)))
        else:
            plan["mlp"] = mlp
        return plan

    def select(self, keep: torch.Tensor) -> None:
        """Keep the rows `keep` [A'], increasing indices into the current rows (as the decode loops
        drop finished rows). The buffers are compacted in place: each kept row after the first dropped
        one moves up, only its filled positions are copied, and the buffers become views of their
        first A' rows."""
        order = keep.tolist()
        if any(a >= b for a, b in zip(order, order[1:])):
            raise ValueError(f"rows to keep must be increasing indices, got {order}")
        first = next((i for i, row in enumerate(order) if row != i), len(order))  # rows before it stay
        filled = self.width + self.steps  # positions written so far: the prompt and the fed tokens
        if first < len(order):
            moved = keep[first:]
            for buffer in (*self.keys, *self.values):  # [A, kvh, W+N, hd]
                part = buffer[:, :, :filled]
                part[first: len(order)] = part.index_select(0, moved)
        self.keys = [k[: len(order)] for k in self.keys]
        self.values = [v[: len(order)] for v in self.values]
        self.bias, self.next_pos = self.bias[keep], self.next_pos[keep]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, weight, self.eps)

    def _attention(self, i: int, p: dict, x: torch.Tensor, cos, sin, slot: int, mask: torch.Tensor) -> torch.Tensor:
        rows, h, kvh = x.shape[0], self.heads, self.kv_heads
        qkv = self._linear(x, p["qkv"]).view(rows, h + 2 * kvh, self.head_dim)  # [A, h+2kvh, hd]
        qk = self._norm(qkv[:, : h + kvh], p["qk_norm"])  # [A, h+kvh, hd]
        qk = qk * cos + torch.mm(qk.view(-1, self.head_dim), self.rot).view(qk.shape) * sin  # rotary embedding
        q = qk[:, :h].unsqueeze(2)  # [A, h, 1, hd]
        keys, values = self.keys[i], self.values[i]  # [A, kvh, W+N, hd]
        keys.select(2, slot).copy_(qk[:, h:])
        values.select(2, slot).copy_(qkv[:, h + kvh :])
        span = slot + 1
        out = F.scaled_dot_product_attention(q, keys.narrow(2, 0, span), values.narrow(2, 0, span),
                                             attn_mask=mask, scale=self.scaling,
                                             enable_gqa=True)  # [A, h, 1, hd]
        return self._linear(out.reshape(rows, -1), p["o"])  # [A, H]

    def _moe(self, p: dict, x: torch.Tensor):
        rows, num = x.shape[0], p["num_experts"]
        sparse = not p["dense"] or rows > self.dense_experts_max_rows
        # so few rows that they choose a small share of the experts: read only the chosen ones' weights
        # (CPU: reading the choices back is free there; on a GPU it would wait for every layer)
        few = not sparse and x.device.type == "cpu" and rows * p["top_k"] <= self.CHOSEN_EXPERTS_MAX_SHARE * num
        column = _column(x) if few and rows == 1 else None  # x's batched right-hand side, made once
        router_logits = self._linear(x, p["router"], column)  # [A, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # [A, E]
        top_w, top_i = torch.topk(probs, p["top_k"], dim=-1)  # [A, k]
        if p["norm_topk"]:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if top_w.dtype != x.dtype:
            top_w = top_w.to(x.dtype)
        if sparse:
            return p["moe"].experts(x, top_i, top_w), top_i
        if few and rows == 1:
            return self._chosen_experts(p, x, top_i, top_w, None, column), top_i
        weights = torch.zeros_like(router_logits).scatter_(1, top_i, top_w)  # [A, E], 0 off the top-k
        if few:
            return self._chosen_experts(p, x, top_i, top_w, weights), top_i
        gate_up = self._linear(x, p["experts_gate_up"]).view(rows, num, -1)  # [A, E, 2I]
        g, u = gate_up.chunk(2, dim=-1)  # [A, E, I] each
        act = F.silu(g) * u * weights.unsqueeze(-1)  # [A, E, I]
        return self._linear(act.reshape(rows, -1), p["down"]), top_i  # [A, H], [A, k]

    @staticmethod
    def _chosen_experts(p: dict, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
                        weights: torch.Tensor | None, column: torch.Tensor | None = None) -> torch.Tensor:
        """x [A, H] through the experts its rows chose, weighted ([A, H]) (CPU). Each chosen expert's
        own weights multiply the rows in place, once per expert: one row expert by expert
        (`_row_product`, weighted by `top_w`); several rows through each expert any of them chose,
        every row weighted by its routing weight for that expert (`weights` [A, E], the dense path's,
        0 where a row did not choose the expert: exact). Nothing is copied or gathered: copies of the chosen weights, and the fresh memory they
        would take every step, cost more than they save here."""
        gate_up, down = p["chosen_gate_up"], p["chosen_down"]  # per expert: [2I, H], [H, I]
        rows, y = x.shape[0], None
        if rows == 1:  # `column`: x's `_column`
            gate_up_halves, down_halves = p["gate_up_halves"], p["down_halves"]
            for e, w in zip(top_i[0].tolist(), top_w[0].tolist()):
                g, u = _row_product(gate_up[e], x, gate_up_halves[e], column).chunk(2, dim=-1)  # [1, I] each
                term = _row_product(down[e], F.silu(g) * u, down_halves[e]) * w  # [1, H]
                y = term if y is None else y + term
            return y
        xt, per_expert = x.t(), weights.t()  # [H, A], [E, A]
        for e in sorted(set(top_i.flatten().tolist())):
            g, u = torch.mm(gate_up[e], xt).chunk(2, dim=0)  # [I, A] each
            term = torch.mm(down[e], F.silu(g) * u * per_expert[e])  # [H, A]
            y = term if y is None else y + term
        return y.t().contiguous()  # [A, H]

    def step(self, token: torch.Tensor):
        """token: [A]. Returns logits [A, V] and routes [A, L, k] (int16) or None."""
        slot = self.width + self.steps
        self.steps += 1
        cos = self.cos[self.next_pos][:, None, :]  # [A, 1, hd]
        sin = self.sin[self.next_pos][:, None, :]
        mask = self.bias[:, None, None, : slot + 1]  # [A, 1, 1, span], the same for every layer
        h = F.embedding(token, self.embed)  # [A, H]
        routes = []
        for i, p in enumerate(self.layers):
            h = h + self._attention(i, p, self._norm(h, p["ln1"]), cos, sin, slot, mask)
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
