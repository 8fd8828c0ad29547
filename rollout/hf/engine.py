"""The transformers rollout engine (`HFEngine`): batched sampling with a KV cache, on CPU or GPU.

All prompts x group size are decoded as one batch. The decode loop is written here rather than
calling `model.generate`, because on small models per-token framework overhead dominates:

- each distinct prompt is prefilled once (`rollout.hf.steppers.prefill`) and its cache copied to the
  group's rows (a group of n shares one prefill);
- decode steps then run through one of two steppers: `rollout.hf.qwen3.FastQwen3Stepper` for Qwen3
  and Qwen3-MoE, `rollout.hf.steppers.GenericStepper` for everything else;
- each step draws a token per live row (`rollout.hf.sampling`) and records it with its logprob;
  finished rows (`rollout.hf.stops`) are dropped from the batch (and the cache); bookkeeping is
  tensor-side, with one host transfer at the end.

CPU:  HFEngine(model, tokenizer).generate(prompt_ids, n=8, sampling=SamplingParams(32))
GPU:  the same, with the model on CUDA (bf16 works; logprobs are computed in float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from rollout.base import Rollout, SamplingParams, progress
from rollout.hf.qwen3 import FastQwen3Stepper
from rollout.hf.sampling import RaceNoise, draw, sampling_logprobs
from rollout.hf.steppers import GenericStepper, prefill
from rollout.hf.stops import StopChecker
from rollout.hf.turns import sample_turns
from rollout.turns import Episodes


class HFEngine:
    """Rollout engine over a transformers causal LM (the policy itself when colocated on CPU).

    Args:
        model, tokenizer: the policy and its tokenizer.
        device: where decoding runs (default: the model's device).
        fast_decode: use the hand-written decode step for Qwen3 / Qwen3-MoE when the model is one
            (`FastQwen3Stepper.supports`); False always uses the model's own forward.
        dense_experts_max_rows: in the fast path, MoE blocks evaluate all experts densely while at
            most this many rows decode, and call the model's experts module above it.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                 fast_decode: bool = True, dense_experts_max_rows: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.fast_decode = fast_decode and FastQwen3Stepper.supports(model)
        self.dense_experts_max_rows = dense_experts_max_rows

    # -- Protocol ------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, episodes: Episodes | None = None
    ) -> list[Rollout]:
        rows = [list(p) for p in prompts for _ in range(n)]
        if episodes is not None and len(episodes) != len(rows):
            raise ValueError(f"{len(episodes)} episodes for {len(rows)} completions")
        if episodes is not None and sampling.record_routing:
            raise ValueError("routed experts are not recorded in multi-turn rollouts (moe.routing_replay=R3)")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        if sampling.prompt_seeds and len(sampling.prompt_seeds) != len(prompts):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt seeds for {len(prompts)} prompts")
        row_seeds = ([sampling.prompt_seeds[b // n] * 1_000_003 + b % n for b in range(len(rows))]
                     if sampling.prompt_seeds else None)
        completions, logprobs, reasons, routing = self._decode(rows, sampling, row_seeds, episodes)
        if episodes is not None:
            return [Rollout(group=b // n, prompt_ids=tuple(prompt), logprobs=tuple(logprobs[b]),
                            **episodes.completion(b)) for b, prompt in enumerate(rows)]
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
    def _decode(self, rows: list[list[int]], sampling: SamplingParams, row_seeds: list[int] | None = None,
                episodes: Episodes | None = None):
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._decode_eval(rows, sampling, row_seeds, episodes)
        finally:
            model.train(was_training)

    def _decode_eval(self, rows: list[list[int]], sampling: SamplingParams, row_seeds: list[int] | None = None,
                     episodes: Episodes | None = None):
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
        stepper_cls = FastQwen3Stepper if self.fast_decode else GenericStepper
        kwargs = {"dense_experts_max_rows": self.dense_experts_max_rows} if self.fast_decode else {}
        stepper = stepper_cls(self.model, cache, attention, positions, max_new, record, **kwargs)
        del cache
        out = _Decoded.empty(batch, max_new, self.pad_id, device, prefill_routes.shape[2:] if record else None)
        noise = RaceNoise(batch, logits.shape[-1], max_new, device, generator, row_generators)
        if episodes is not None:
            sampling = replace(sampling, stop=(*sampling.stop, *episodes.stop))
            sample_turns(stepper, logits, sampling, StopChecker(self.tokenizer, sampling, device), noise, out, episodes)
        else:
            _sample_tokens(stepper, logits, sampling, StopChecker(self.tokenizer, sampling, device), noise, out)
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
        logits, cache, prefill_routes = prefill(self.model, input_ids, attention, positions, record)
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


def _sample_tokens(stepper, logits: torch.Tensor, sampling: SamplingParams, stopper: StopChecker,
                   noise: RaceNoise, out: _Decoded) -> None:
    """The decode loop: draw a token per live row, record it, drop the rows that stopped, step."""
    batch, max_new = out.tokens.shape
    alive = torch.arange(batch, device=out.tokens.device)  # rows still decoding, as indices into the batch
    all_alive = True  # while no row has finished, index with slices instead of `alive`
    for t in range(max_new):
        progress()
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
