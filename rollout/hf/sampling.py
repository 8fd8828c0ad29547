"""Sampling maths of the transformers engine: the distribution a token is drawn from and the draw.

For every drawn token the engine records its log-probability under the distribution it was actually
drawn from (after temperature, top-k and top-p), which is what sampler-mismatch corrections need;
tests check the logprobs against a teacher-forced forward pass of the model to 1e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.base import SamplingParams


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
