"""The transformers rollout engine: batched sampling with a KV cache, on CPU or GPU.

All prompts x group size are decoded as one batch. The decode loop is written here rather than
calling `model.generate`, because on small models per-token framework overhead dominates: the
loop keeps left-padded prompts in one cache, never re-pads, drops finished rows from the batch,
and records, for every drawn token, its log-probability under the distribution it was actually
drawn from (after temperature, top-k and top-p), which is what sampler-mismatch corrections need.

For MoE models it can record the experts every token was routed to (forward hooks on the
routers), for routing replay in the trainer.

CPU:  HFEngine(model, tokenizer).generate(prompt_ids, n=8, sampling=SamplingParams(32))
GPU:  the same, with the model on CUDA (bf16 works; logprobs are computed in float32).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from rollout.base import Rollout, SamplingParams


def sampling_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from.

    logits: [B, V] raw next-token logits. Returns [B, V] float32 log-probs after temperature,
    top-k and top-p (filtered tokens get -inf). With temperature 1 and no filtering this is the
    model's own log_softmax, so the sampler's logprobs equal a teacher-forced forward pass.
    """
    if sampling.temperature == 0.0:  # greedy: report the model's own log-probabilities
        return F.log_softmax(logits.float(), dim=-1)  # [B, V]
    scores = logits.float() / sampling.temperature  # [B, V]
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [B, V]
        cumulative = sorted_scores.softmax(-1).cumsum(-1)  # [B, V]
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= sampling.top_p  # [B, V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        scores = scores.masked_fill(drop, float("-inf"))
    return F.log_softmax(scores, dim=-1)  # [B, V]


class RoutingRecorder:
    """Collects, per forward call, the top-k expert indices every MoE router chose.

    Works with transformers MoE blocks whose router module returns `(logits, weights, indices)`
    (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral in transformers >= 5). Each call appends one tensor
    [tokens_in_call, num_layers, top_k].
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for name, m in model.named_modules() if _is_router(name, m)]
        self.calls: list[torch.Tensor] = []
        self._current: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "RoutingRecorder":
        for router in self.routers:
            self._handles.append(router.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, output) -> None:
        indices = output[2] if isinstance(output, tuple) else None
        if indices is not None:
            self._current.append(indices.detach().to("cpu", torch.int16))

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


def _is_router(name: str, module: torch.nn.Module) -> bool:
    return name.endswith("mlp.gate") and hasattr(module, "top_k") and hasattr(module, "num_experts")


class _StopChecker:
    """Decides, after each drawn token, whether a sequence has finished.

    Stop strings that are one token become stop ids (a set lookup); longer ones are matched
    against the decoded tail of the sequence, which is bounded by the stop string's length.
    """

    def __init__(self, tokenizer, sampling: SamplingParams):
        self.tokenizer = tokenizer
        self.stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos and tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self.text_stops: list[str] = []
        for stop in sampling.stop:
            ids = tokenizer.encode(stop, add_special_tokens=False)
            if len(ids) == 1 and tokenizer.decode(ids) == stop:
                self.stop_ids.add(ids[0])
            else:
                self.text_stops.append(stop)
        self.tail_tokens = max((len(s) for s in self.text_stops), default=0)

    def finished(self, completion: list[int]) -> bool:
        if completion[-1] in self.stop_ids:
            return True
        if self.text_stops:
            tail = self.tokenizer.decode(completion[-self.tail_tokens :], skip_special_tokens=False)
            return any(stop in tail for stop in self.text_stops)
        return False


class HFEngine:
    """Rollout engine over a transformers causal LM (the policy itself when colocated on CPU)."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- Protocol ------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams
    ) -> list[Rollout]:
        rows = [list(p) for p in prompts for _ in range(n)]
        groups = [i for i in range(len(prompts)) for _ in range(n)]
        if sampling.prompt_seeds and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        row_seeds = [sampling.prompt_seeds[g] * 1_000_003 + b % n for b, g in enumerate(groups)] if sampling.prompt_seeds else None
        completions, logprobs, reasons, routing = self._decode(rows, sampling, row_seeds)
        out = []
        for b, (prompt, completion) in enumerate(zip(rows, completions)):
            out.append(
                Rollout(
                    group=groups[b],
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

    def close(self) -> None:
        self.model = None

    # -- decoding ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode(self, rows: list[list[int]], sampling: SamplingParams, row_seeds: list[int] | None = None):
        model, device = self.model, self.device
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        row_generators = None
        if row_seeds is not None:
            row_generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
        stopper = _StopChecker(self.tokenizer, sampling)
        batch = len(rows)
        width = max(map(len, rows))
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for b, row in enumerate(rows):  # left padding keeps every row's last token at column -1
            input_ids[b, width - len(row) :] = torch.tensor(row)
            attention[b, width - len(row) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [B, W]

        completions: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        alive = torch.arange(batch, device=device)  # rows still decoding, as indices into the batch
        routes: list[list[torch.Tensor]] | None = [[] for _ in range(batch)] if sampling.record_routing else None

        recorder = RoutingRecorder(model) if sampling.record_routing else None
        with recorder if recorder is not None else contextlib.nullcontext():
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]  # logits: [B, V]
            if recorder is not None:
                prefill = recorder.end_call().view(batch, width, -1, recorder.routers[0].top_k)
                for b, row in enumerate(rows):
                    routes[b].append(prefill[b, width - len(row) :])
            next_pos = positions[:, -1:] + 1  # [B, 1]
            for _ in range(sampling.max_new_tokens):
                lp = sampling_logprobs(logits, sampling)  # [A, V]
                if sampling.temperature == 0.0:
                    token = lp.argmax(-1, keepdim=True)  # [A, 1]
                elif row_generators is not None:  # inverse CDF with one uniform per row, from the row's generator
                    cdf = lp.exp().cumsum(-1)  # [A, V]
                    u = torch.cat([torch.rand(1, generator=row_generators[b], device=device) for b in alive.tolist()])
                    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)  # [A, 1]
                    token = token.clamp(max=cdf.shape[-1] - 1)
                else:
                    token = torch.multinomial(lp.exp(), 1, generator=generator)  # [A, 1]
                token_lp = lp.gather(-1, token).squeeze(-1).tolist()  # [A]
                token_list = token.squeeze(-1).tolist()
                keep = []
                for j, b in enumerate(alive.tolist()):
                    completions[b].append(token_list[j])
                    logprobs[b].append(token_lp[j])
                    if stopper.finished(completions[b]):
                        reasons[b] = "stop"
                    else:
                        keep.append(j)
                if not keep or len(completions[alive[0].item()]) >= sampling.max_new_tokens:
                    break
                if len(keep) < len(alive):  # drop finished rows from the batch and the cache
                    idx = torch.tensor(keep, device=device)
                    alive, token, attention, next_pos = alive[idx], token[idx], attention[idx], next_pos[idx]
                    cache.batch_select_indices(idx)
                attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)  # [A, W+t]
                out = model(
                    input_ids=token, attention_mask=attention, position_ids=next_pos,
                    past_key_values=cache, use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[:, -1, :]
                if recorder is not None:
                    step_routes = recorder.end_call()  # [A, L, k]
                    for j, b in enumerate(alive.tolist()):
                        routes[b].append(step_routes[j : j + 1])
                next_pos = next_pos + 1
        model.train(was_training)
        routing = None
        if routes is not None:
            # The last drawn token of each row was never fed back, so it has no routing yet:
            # record up to (prompt + completion - 1) tokens, the positions a training forward sees.
            routing = [torch.cat(r, dim=0) for r in routes]
        return completions, logprobs, reasons, routing
