"""When a row stops: EOS, stop token ids and stop strings, checked after each drawn token."""

from __future__ import annotations

import torch

from rollout.base import SamplingParams


class StopChecker:
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
