"""Padding-free training forwards: the sequences of a micro-batch concatenated into one row.

A right-padded micro-batch [B, S] costs B x S positions in every layer whatever its lengths; a
group holding a 200-token and a 6,000-token completion pays 6,000 for both. Here the real tokens
of the micro-batch run as one packed row [1, T] (T = the sum of the lengths): position ids
restart at 0 for every sequence and attention never crosses a sequence boundary, so every token
sees exactly the context it sees in the padded batch and the log-probabilities, the loss and the
gradients are the padded ones to float rounding (tests/grpo/algo/test_packing.py).

Attention. transformers detects packed rows from position ids only for flash-attention (varlen
kernels) and, for SDPA, turns them into a materialised block-diagonal [T, T] mask, whose cost grows
with the square of the whole row. Instead, `install()` wraps the registered `sdpa` attention
function once: a call that carries the `Segments` of a packed row (the keyword `PACKED`, passed
down through the model's forward like transformers' own flash-attention keywords, so activation
checkpointing recomputes with it) runs SDPA per sequence, causal within it; every other call goes
to the original function untouched. The model gets a placeholder 4-D mask, which transformers
passes through as it is, so no mask is built. Models that run another attention implementation
(eager, flash-attention, flex), use sliding windows, attention logit soft-capping or attention
sinks are not packed (`packing_supported`): they keep the right-padded forward, which is exact.

Shared prompts (`share_prompts`): one packed row holds the distinct prompts of the micro-batch
once, then the completions, each completion's attention reading its own prompt's keys in the
same row (a prefix segment) and its own earlier tokens. Unlike the padded shared-prompt forward
(grpo/algo/logprobs.py) nothing is copied per row: the prompt's keys are read in place, and
gradients from every completion reach them. One forward, not a prompt forward and a completion
forward on its cache: every weight is read, and its gradient accumulated, once per micro-batch
(one spread-length update of the bench's small model: 259 ms against 292).

Routing replay and expert-load counts are defined on the right-padded layout [B, S]; every packed
forward tells the routing scope which full-layout position each of its tokens stands for
(`grpo.algo.logprobs.TokenPart`), so the recorded experts of a token follow it into the packed
order and R2 records come back in the padded layout.

A micro-batch that is hardly padded (`PACK_MIN_PADDING`) runs right-padded: the same values.

Returned values follow the padded layout: [B, S-1], entry t scores token t+1, filled at the
completion positions (entries prompt_len - 1 ... seq_len - 2) and zero elsewhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo.algo.logprobs import _is_fsdp, _unwrapped

PACKED = "grpo_packed_segments"  # the keyword that carries a packed row's Segments to the attention function

# A micro-batch with less padding than this share of its right-padded positions runs padded: there
# packing saves little and its per-sequence attention calls cost more. Measured on this project's
# 2-core machine (bench/step_vs_trl.py's small model, one update of 16 rows): 32-token completions
# (~3% padding) 4.5 s padded, 6.5 s packed; the spread lengths (~70% padding) 15.6 s padded, 5.3 s packed.
PACK_MIN_PADDING = 0.1


@dataclass(frozen=True)
class Segments:
    """Which keys each sequence of a packed row attends to.

    queries: (start, end) of every sequence's tokens in the row (the queries of this forward), in
        order and tiling the row: each starts where the previous ends, the first at 0
    prefixes: per sequence, (start, end) of the row's keys it reads in full before its own (its
        prompt's), or None
    """

    queries: tuple[tuple[int, int], ...]
    prefixes: tuple[tuple[int, int] | None, ...]


def _segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segs: Segments,
                       scaling: float | None, dropout: float) -> torch.Tensor:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (the row's own) -> [1, T, Hq, D]: SDPA per sequence."""
    groups = query.shape[1] // key.shape[1]
    bounds = segs.queries
    # the sequences tile the row: split it (whose backward joins the pieces' gradients once) rather
    # than slice it per sequence (each slice's backward fills a zero tensor of the whole row)
    sizes = [end - start for start, end in bounds]
    pieces = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    prefix_kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # one slice per distinct prefix
    outs = []
    for (start, end), prefix, (q, k, v) in zip(bounds, segs.prefixes, pieces):  # [1, Hq, n, D], [1, Hkv, n, D] x2
        mask = None
        if prefix is not None:
            if prefix not in prefix_kv:
                prefix_kv[prefix] = key[:, :, prefix[0]: prefix[1]], value[:, :, prefix[0]: prefix[1]]
            k = torch.cat([prefix_kv[prefix][0], k], dim=2)  # [1, Hkv, p + n, D]
            v = torch.cat([prefix_kv[prefix][1], v], dim=2)  # [1, Hkv, p + n, Dv]
            n, p = end - start, prefix[1] - prefix[0]
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(diagonal=p)  # [n, p + n]
        # grouped-query attention (each key/value head serves Hq / Hkv query heads) inside the kernel
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                   is_causal=mask is None and end - start > 1, enable_gqa=groups > 1))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()  # [1, T, Hq, Dv]


def _wrap_sdpa(original):
    @functools.wraps(original)
    def sdpa_or_packed(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs):
        segs = kwargs.get(PACKED)
        if segs is None:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return _segment_attention(query, key, value, segs, scaling, dropout), None

    sdpa_or_packed.grpo_packed = True
    return sdpa_or_packed


def install() -> None:
    """Wrap transformers' registered `sdpa` attention function once (see the module docstring)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(current, "grpo_packed", False):
        AttentionInterface.register("sdpa", _wrap_sdpa(current))


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether a packed forward of this model is exact: a transformers decoder on SDPA attention
    whose every layer attends over the full context, without attention logit soft-capping or sinks."""
    inner = _unwrapped(model)
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or not hasattr(inner, "get_decoder"):
        return False
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if layer_types is None and getattr(cfg, "sliding_window", None) is not None:
        return False
    return not any(hasattr(m, "sinks") for m in inner.modules())


def worth_packing(attention_mask: torch.Tensor) -> bool:
    """Whether a right-padded micro-batch [B, S] pads at least PACK_MIN_PADDING of its positions."""
    return 1.0 - attention_mask.sum().item() / max(attention_mask.numel(), 1) >= PACK_MIN_PADDING


def micro_batches(lengths: list[int], max_sequences: int, max_tokens: int | None, packed: bool) -> list[slice]:
    """Consecutive runs of rows, each at most `max_sequences` rows and (when `max_tokens` is set) at
    most `max_tokens` positions: the sum of the lengths when packed, rows x the longest when padded.
    A row longer than the budget is a micro-batch of its own.

    >>> micro_batches([5, 3, 9, 2, 2], 64, 10, packed=True)
    [slice(0, 2, None), slice(2, 3, None), slice(3, 5, None)]
    >>> micro_batches([5, 3, 9, 2, 2], 64, 10, packed=False)
    [slice(0, 2, None), slice(2, 3, None), slice(3, 5, None)]
    >>> micro_batches([4, 4, 4], 2, None, packed=True)
    [slice(0, 2, None), slice(2, 3, None)]
    """
    out, start, total, longest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        cost = total + n if packed else rows * max(longest, n)
        if i > start and (rows > max_sequences or (max_tokens is not None and cost > max_tokens)):
            out.append(slice(start, i))
            start, total, longest = i, 0, 0
        total, longest = total + n, max(longest, n)
    if lengths:
        out.append(slice(start, len(lengths)))
    return out


def split_to(chunks: list[slice], count: int) -> list[slice]:
    """`chunks` cut further (the largest first, in halves) until there are `count` of them, or every
    one is a single row; processes that run collectives per forward need the same count.

    >>> split_to([slice(0, 4), slice(4, 5)], 4)
    [slice(0, 1, None), slice(1, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    chunks = list(chunks)
    while len(chunks) < count:
        i = max(range(len(chunks)), key=lambda j: chunks[j].stop - chunks[j].start)
        c = chunks[i]
        if c.stop - c.start < 2:
            break
        mid = c.start + (c.stop - c.start) // 2
        chunks[i: i + 1] = [slice(c.start, mid), slice(mid, c.stop)]
    return chunks


@dataclass(frozen=True)
class _Scored:
    """Which hidden state scores which token, and where the result goes in the padded layout."""

    hidden: torch.Tensor  # [N] index into the forward's hidden states
    target: torch.Tensor  # [N] token ids
    row: torch.Tensor  # [N]
    entry: torch.Tensor  # [N] column of the [B, S-1] output


def _run(model, ids: list[int], positions: list[int], segs: Segments, device) -> torch.Tensor:
    """One packed row through the decoder: hidden states [T, H]."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, T]
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # a 4-D mask is passed through unread
    inner = _unwrapped(model)
    wrapped = inner is not model or _is_fsdp(model)
    if wrapped:  # through the wrapper's forward (DDP's gradient bookkeeping, FSDP's unsharding)
        out = model(input_ids=input_ids, attention_mask=placeholder, position_ids=position_ids,
                    output_hidden_states=True, logits_to_keep=1, output_router_logits=False, **{PACKED: segs})
        return out.hidden_states[-1][0]
    out = inner.get_decoder()(input_ids=input_ids, attention_mask=placeholder, position_ids=position_ids,
                              **{PACKED: segs})
    return out.last_hidden_state[0]


def packed_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 512,
    routing=None,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and entropy) of the completions of a right-padded micro-batch, computed
    on packed rows (see the module docstring).

    input_ids, attention_mask: [B, S] right-padded; prompt_lens: [B]
    share_prompts: each distinct prompt runs once (one forward as well, so any model that packs can)
    routing: the MoE `RoutingScope` of this forward (None for dense models)
    Returns logprobs [B, S-1] and, if asked, entropy [B, S-1]: values at completion positions,
    zeros elsewhere.
    """
    from grpo.algo.logprobs import _head_logprobs, _upcast

    install()
    device = input_ids.device
    batch, width = input_ids.shape
    lens = attention_mask.sum(-1).tolist()
    plens = prompt_lens.tolist()
    rows = input_ids.tolist()
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    try:
        if share_prompts:
            hidden, scored = _shared_forward(model, rows, lens, plens, width, device, routing)
        else:
            hidden, scored = _full_forward(model, rows, lens, plens, width, device, routing)
    finally:
        if routing is not None:
            routing.set_part(None)
    if scored.hidden.numel() == 0:  # no completion tokens: zeros, still tied to the forward for autograd
        zeros = _upcast(hidden.new_zeros(batch, width - 1) + hidden.sum() * 0)  # [B, S-1]
        return zeros, (zeros.detach() if with_entropy else None)
    lp, ent = _head_logprobs(hidden[scored.hidden][None], scored.target[None], head, temperature, softcap,
                             chunk)  # [1, N] x2
    logprobs = lp.new_zeros(batch, width - 1).index_put((scored.row, scored.entry), lp[0])  # [B, S-1]
    entropy = ent.new_zeros(batch, width - 1).index_put((scored.row, scored.entry), ent[0]) if with_entropy else None
    return logprobs, entropy


def _full_forward(model, rows, lens, plens, width, device, routing):
    """Every sequence whole, packed into one row."""
    from grpo.algo.logprobs import TokenPart

    ids, positions, queries, flat = [], [], [], []
    hidden_idx, target, row_of, entry = [], [], [], []
    for b, (row, n, p) in enumerate(zip(rows, lens, plens)):
        start = len(ids)
        ids += row[:n]
        positions += range(n)
        queries.append((start, start + n))
        flat += range(b * width, b * width + n)
        hidden_idx += range(start + p - 1, start + n - 1)  # hidden state t scores token t + 1
        target += row[p:n]
        row_of += [b] * (n - p)
        entry += range(p - 1, n - 1)
    if routing is not None:
        position = torch.tensor(flat, dtype=torch.long, device=device)  # [T]
        routing.set_part(TokenPart(position, torch.ones(len(flat), device=device),
                                   torch.arange(len(flat), device=device), position))
    hidden = _run(model, ids, positions, Segments(tuple(queries), (None,) * len(queries)), device)  # [T, H]
    return hidden, _scored(hidden_idx, target, row_of, entry, device)


def _shared_forward(model, rows, lens, plens, width, device, routing):
    """One packed row: the distinct prompts, then the completions, each completion's attention
    reading its prompt's keys in the same row (a prefix segment) and its own earlier tokens."""
    from grpo.algo.logprobs import TokenPart

    distinct: dict[tuple[int, ...], int] = {}
    prompt_of = [distinct.setdefault(tuple(row[:p]), len(distinct)) for row, p in zip(rows, plens)]
    first_row = {}
    for b, q in enumerate(prompt_of):
        first_row.setdefault(q, b)
    ids, pos, queries, prefixes, flat, weight = [], [], [], [], [], []
    sharing = [prompt_of.count(q) for q in range(len(distinct))]
    for q, prompt in enumerate(distinct):
        start = len(ids)
        ids += prompt
        pos += range(len(prompt))
        queries.append((start, start + len(prompt)))
        prefixes.append(None)
        flat += range(first_row[q] * width, first_row[q] * width + len(prompt))
        weight += [float(sharing[q])] * len(prompt)
    prompt_spans = list(queries)
    hidden_idx, target, row_of, entry = [], [], [], []
    src, dst = [], []  # token src[i] of the row fills full-layout position dst[i] (routing)
    for b, (row, n, p) in enumerate(zip(rows, lens, plens)):
        pstart, pend = prompt_spans[prompt_of[b]]
        src += range(pstart, pend)
        dst += range(b * width, b * width + p)
        if n == p:
            continue
        start = len(ids)
        ids += row[p:n]
        pos += range(p, n)
        queries.append((start, start + n - p))
        prefixes.append((pstart, pend))
        flat += range(b * width + p, b * width + n)
        weight += [1.0] * (n - p)
        src += range(start, start + n - p)
        dst += range(b * width + p, b * width + n)
        hidden_idx += [pend - 1, *range(start, start + n - p - 1)]  # first token: the prompt's last state
        target += row[p:n]
        row_of += [b] * (n - p)
        entry += range(p - 1, n - 1)
    if routing is not None:
        routing.set_part(TokenPart(torch.tensor(flat, dtype=torch.long, device=device),
                                   torch.tensor(weight, device=device), torch.tensor(src, device=device),
                                   torch.tensor(dst, device=device)))
    hidden = _run(model, ids, pos, Segments(tuple(queries), tuple(prefixes)), device)  # [T, H]
    return hidden, _scored(hidden_idx, target, row_of, entry, device)


def _scored(hidden_idx, target, row_of, entry, device) -> _Scored:
    def as_tensor(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Scored(as_tensor(hidden_idx), as_tensor(target), as_tensor(row_of), as_tensor(entry))
