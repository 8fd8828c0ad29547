"""Per-token log-probabilities (and entropy) of completions under the policy, in chunks.

Teacher forcing: one forward pass of the decoder over prompt + completion; the log-probability of
token t comes from the hidden state at position t - 1. Logits are divided by the sampling
temperature, so these are log-probabilities of the distribution the sampler drew from (before
top-k/top-p).

Memory: the full logits tensor is [B, S, V] (2 x 4096 x 151936 float32 is 5 GB, and log_softmax
doubles it). Here the output head is applied to `chunk` positions at a time; log_softmax, the
gather and the entropy are taken per chunk, and each chunk runs under activation checkpointing, so
backward recomputes that chunk's logits instead of keeping them. Peak logits memory is then
proportional to B x chunk x V, in forward and in backward. (When the whole batch's logits are
small, under CHECKPOINT_ABOVE_BYTES, they are kept instead: recomputing would cost more.) The values are the same as the plain
full-logits computation (`token_logprobs_plain`, kept as the reference for tests and the bench).

Works for transformers causal LMs whose forward is `lm_head(decoder(...).last_hidden_state)`
(Llama, Qwen2/3, Qwen3-MoE, Mistral, ...), and applies Gemma-2-style final logit soft-capping when
the config asks for it. MoE router logits are not requested here. A wrapped model (DDP, FSDP2,
DeepSpeed) runs its own forward with `output_hidden_states=True` and one position of logits, so
the wrapper's hooks see the pass; the head is then applied in chunks as above.

Shared prompts (`prompt_lens`, on by default through `trainer.shared_prompt_forward`): a GRPO
batch repeats every prompt group-size times. `shared_prompt_logprobs` runs each distinct prompt
once, copies its KV cache to the rows (differentiably) and runs the completions on it: the same
log-probabilities and gradients (to float rounding) for 1/n of the prompt's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rollout.hf.steppers import cache_keyword, output_cache

# Below this size of batch logits (float32 bytes) keeping them for backward costs less than
# recomputing them chunk by chunk (tiny vocabularies, short batches).
CHECKPOINT_ABOVE_BYTES = 64 * 2**20


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float32/float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, c, H], targets [B, c] -> logprobs [B, c], entropy [B, c] (entropy without grad)."""
    logits = _upcast(head(hidden))  # [B, c, V]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap  # [B, c, V]
    if temperature != 1.0:
        logits = logits / temperature  # [B, c, V]
    logp_all = F.log_softmax(logits, dim=-1)  # [B, c, V]
    del logits  # log_softmax's backward needs only its output: at most two [B, c, V] tensors live below
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, c]
    with torch.no_grad():  # H = -sum_v p_v log p_v as a batched dot product (no third [B, c, V] tensor)
        entropy = -(logp_all.exp().unsqueeze(-2) @ logp_all.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # [B, c]
    return logprobs, entropy


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: no FSDP2
        return False
    return isinstance(model, FSDPModule)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "get_decoder") else model  # DDP, DeepSpeed


def _head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float,
                   softcap: float | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, H] scoring targets [B, T] -> logprobs [B, T], entropy [B, T], `chunk` positions of
    logits at a time (each chunk under activation checkpointing when grad flows and the logits of
    the whole batch would take more than CHECKPOINT_ABOVE_BYTES)."""
    logits_bytes = hidden.shape[0] * hidden.shape[1] * head.weight.shape[0] * 4  # float32 log-softmax output
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad and logits_bytes > CHECKPOINT_ABOVE_BYTES
    logprobs, entropy = [], []
    for start in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, start : start + chunk], targets[:, start : start + chunk]  # [B, c, H], [B, c]
        if use_checkpoint:
            lp, ent = checkpoint(_chunk_logprobs, h, y, head, temperature, softcap, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, y, head, temperature, softcap)
        logprobs.append(lp)  # [B, c]
        entropy.append(ent)  # [B, c]
    return torch.cat(logprobs, dim=1), torch.cat(entropy, dim=1)  # [B, T] x2


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 512,
    prompt_lens: torch.Tensor | None = None,
    routing=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of input_ids[:, 1:] given the prefix, `chunk` positions of logits at a time.

    input_ids, attention_mask: [B, S] (right-padded: row b is prompt + completion + padding)
    prompt_lens: [B] prompt lengths; when given and the model allows it (`shared_prompt_supported`),
        rows with the same prompt share one forward of it (`shared_prompt_logprobs`); the returned
        values are then defined at completion positions only (zeros elsewhere).
    routing: the MoE `RoutingScope` of this forward, told which tokens each forward runs
        (only needed with shared prompts).
    Returns logprobs [B, S-1] (entry t scores token t+1) and, if asked, entropy [B, S-1].
    """
    if prompt_lens is not None and shared_prompt_supported(model):
        return shared_prompt_logprobs(model, input_ids, attention_mask, prompt_lens, temperature, with_entropy,
                                      chunk, routing)
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    positions = _positions(attention_mask)
    if inner is not model or _is_fsdp(model):
        # through the wrapper's forward (DDP's gradient bookkeeping, FSDP's unsharding), with logits
        # for one position only; the last hidden state (after the final norm) is the decoder's
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=True, logits_to_keep=1)
        last = out.hidden_states[-1]  # [B, S, H]
    else:
        last = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=positions).last_hidden_state  # [B, S, H]
    hidden = last[:, :-1, :]  # [B, S-1, H]
    targets = input_ids[:, 1:]  # [B, S-1]
    logprobs, entropy = _head_logprobs(hidden, targets, head, temperature, softcap, chunk)  # [B, S-1] x2
    return logprobs, (entropy if with_entropy else None)


# --- shared prompts: one forward per distinct prompt, completions on copies of its KV cache --------


def shared_prompt_supported(model: torch.nn.Module) -> bool:
    """Whether `shared_prompt_logprobs` can run this model: an unwrapped transformers decoder (a
    DDP or FSDP wrapper must see exactly one forward per backward) without gradient checkpointing
    (which turns the cache off), with sdpa or eager attention, whose every layer attends over the
    full context (no sliding windows or linear-attention layers, whose caches do not keep every
    position)."""
    if _unwrapped(model) is not model or _is_fsdp(model) or not hasattr(model, "get_decoder"):
        return False
    checkpointing = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    if getattr(model, checkpointing, False):
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False  # flash-attention / flex kernels: their padding handling with a cache is not checked here
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(cfg, "sliding_window", None) is None


@dataclass
class TokenPart:
    """The tokens one forward of a shared-prompt pass runs, mapped onto the right-padded full layout
    [B, S] (flattened to B*S positions) that routing replay and expert-load counts are defined on.

    position: [T] the full-layout position each token stands for (its first row's, for a prompt
        token shared by several rows); padding tokens point at position 0 with weight 0
    weight: [T] how many full-layout positions the token stands for (rows sharing the prompt; 0 for
        padding), so counts and the load-balancing loss equal those of the full layout
    src, dst: [N] token `src[i]` fills full-layout position `dst[i]` (every covered position once)
    """

    position: torch.Tensor
    weight: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def shared_prompt_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 512,
    routing=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` at completion positions, each distinct prompt run once.

    In GRPO every prompt is sampled n times, so a right-padded batch repeats each prompt n times.
    Here the distinct prompts run once (left-padded, [P, Wp]) with a KV cache; the cache is copied
    to the rows (differentiably: gradients from every completion flow back into the prompt's
    keys and values) and the completions run on it ([B, Wc], positions continuing the prompt's).
    The first completion token is scored by the prompt's last hidden state, the others by the
    completion forward's. Same values as the full forward up to float rounding (tests check
    values and gradients); the prompt's share of the work drops from n copies to one.

    input_ids, attention_mask: [B, S] right-padded; prompt_lens: [B]
    Returns logprobs [B, S-1] and, if asked, entropy [B, S-1], at completion positions (entry
    t scores token t+1); zeros at prompt and padding positions.
    """
    batch, width = input_ids.shape
    lay = _shared_layout(input_ids, attention_mask, prompt_lens.to(input_ids.device))
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    if routing is not None:
        routing.set_part(_prompt_routing_part(lay, batch, width))
    out = decoder(input_ids=lay.prompt_ids, attention_mask=lay.prompt_mask, position_ids=_positions(lay.prompt_mask),
                  use_cache=True)
    cache = output_cache(out)
    first_hidden = out.last_hidden_state[:, -1][lay.row_prompt]  # [B, H] scores each completion's first token
    cache.reorder_cache(lay.row_prompt)  # [P, ...] -> [B, ...] by index_select (differentiable; backward is index_add)
    if routing is not None:
        flat = (torch.arange(batch, device=input_ids.device)[:, None] * width + lay.comp_col).reshape(-1)  # [B*Wc]
        valid = lay.comp_mask.reshape(-1).bool()  # [B*Wc]
        routing.set_part(TokenPart(flat, valid.to(torch.float32), torch.nonzero(valid).squeeze(-1), flat[valid]))
    try:
        comp_hidden = decoder(input_ids=lay.comp_ids,
                              attention_mask=torch.cat([lay.prompt_mask[lay.row_prompt], lay.comp_mask], 1),
                              position_ids=lay.prompt_lens[:, None] + lay.ccols, use_cache=True,
                              **{cache_keyword(decoder): cache}).last_hidden_state  # [B, Wc, H]
    finally:
        if routing is not None:
            routing.set_part(None)
    hidden = torch.cat([first_hidden[:, None], comp_hidden[:, :-1]], dim=1)  # [B, Wc, H]
    lp, ent = _head_logprobs(hidden, lay.comp_ids, head, temperature, softcap, chunk)  # [B, Wc] x2
    # back to the full layout: completion token j of row b is scored at entry prompt_len + j - 1;
    # padding entries go to an extra column that is cut off
    entry = torch.where(lay.comp_mask.bool(), lay.prompt_lens[:, None] - 1 + lay.ccols,
                        torch.full_like(lay.ccols, width - 1))  # [B, Wc]
    logprobs = lp.new_zeros(batch, width).scatter(1, entry, lp)[:, : width - 1]  # [B, S-1]
    entropy = ent.new_zeros(batch, width).scatter(1, entry, ent)[:, : width - 1] if with_entropy else None
    return logprobs, entropy


@dataclass(frozen=True)
class _SharedLayout:
    """Where a right-padded [B, S] batch's distinct prompts and its completions go."""

    prompt_lens: torch.Tensor  # [B]
    row_prompt: torch.Tensor  # [B] index of each row's distinct prompt (in order of first appearance)
    first_row: torch.Tensor  # [P] the first row of each distinct prompt
    src_col: torch.Tensor  # [P, Wp] full-layout column of each left-padded prompt column
    prompt_mask: torch.Tensor  # [P, Wp]
    prompt_ids: torch.Tensor  # [P, Wp] the distinct prompts, left-padded
    ccols: torch.Tensor  # [1, Wc]
    comp_mask: torch.Tensor  # [B, Wc]
    comp_col: torch.Tensor  # [B, Wc] full-layout column of each completion token
    comp_ids: torch.Tensor  # [B, Wc]


def _shared_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> _SharedLayout:
    device = input_ids.device
    batch, width = input_ids.shape
    seq_lens = attention_mask.sum(-1)  # [B]
    # distinct prompts: rows whose prompt tokens (and length) are equal share one
    wp = int(prompt_lens.max())  # the longest prompt: width of the left-padded prompt batch
    in_prompt = torch.arange(width, device=device)[None] < prompt_lens[:, None]  # [B, S]
    keys = torch.where(in_prompt[:, :wp], input_ids[:, :wp], torch.full_like(input_ids[:, :wp], -1))  # [B, Wp]
    _, row_prompt = torch.unique(keys, dim=0, return_inverse=True)  # [B] index of each row's prompt
    num_prompts = int(row_prompt.max()) + 1
    first_row = torch.zeros(num_prompts, dtype=torch.long, device=device)
    first_row.scatter_reduce_(0, row_prompt, torch.arange(batch, device=device), "amin", include_self=False)
    # number the prompts in order of first appearance (unique sorts them by value)
    first_row, order = first_row.sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_prompts, device=device)
    row_prompt = rank[row_prompt]  # [B]
    p_lens = prompt_lens[first_row]  # [P]
    src_col = torch.arange(wp, device=device)[None] - (wp - p_lens[:, None])  # [P, Wp]
    prompt_mask = (src_col >= 0).long()  # [P, Wp]
    prompt_ids = input_ids[first_row].gather(1, src_col.clamp(min=0)) * prompt_mask  # [P, Wp]
    comp_lens = seq_lens - prompt_lens  # [B]
    ccols = torch.arange(max(int(comp_lens.max()), 1), device=device)[None]  # [1, Wc]
    comp_mask = (ccols < comp_lens[:, None]).long()  # [B, Wc]
    comp_col = (prompt_lens[:, None] + ccols).clamp(max=width - 1)  # [B, Wc] full-layout column
    comp_ids = input_ids.gather(1, comp_col) * comp_mask  # [B, Wc]
    return _SharedLayout(prompt_lens, row_prompt, first_row, src_col, prompt_mask, prompt_ids, ccols, comp_mask,
                         comp_col, comp_ids)


def _prompt_routing_part(lay: _SharedLayout, batch: int, width: int) -> TokenPart:
    """The prompt forward's tokens in the full [B, S] layout: each distinct prompt's position is
    weighted by the rows sharing it, and every row's prompt positions are filled from it."""
    device = lay.prompt_ids.device
    num_prompts, wp = lay.prompt_ids.shape
    row_cols = torch.arange(width, device=device)[None]  # [1, S]
    in_prompt = row_cols < lay.prompt_lens[:, None]  # [B, S]
    sharing = torch.bincount(lay.row_prompt, minlength=num_prompts).to(torch.float32)  # [P] rows per prompt
    position = (lay.first_row[:, None] * width + lay.src_col.clamp(min=0)).reshape(-1)  # [P*Wp]
    weight = (lay.prompt_mask * sharing[:, None]).reshape(-1)  # [P*Wp]
    src = (lay.row_prompt[:, None] * wp + (wp - lay.prompt_lens[:, None]) + row_cols)[in_prompt]  # [N]
    dst = (torch.arange(batch, device=device)[:, None] * width + row_cols)[in_prompt]  # [N]
    return TokenPart(position, weight, src, dst)


def token_logprobs_plain(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The reference computation: full [B, S, V] logits, then log_softmax and gather; [B, S-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)).logits
    logits = _upcast(logits)  # [B, S, V]
    if temperature != 1.0:
        logits = logits / temperature  # [B, S, V]
    logp_all = F.log_softmax(logits, dim=-1)  # [B, S, V]; on the contiguous tensor, so no extra copy
    return logp_all[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, S-1]
