"""The transformers engine's multi-turn decode loop: environment turns go through the KV cache.

One batch decodes every row. When a row's policy turn ends (end-of-sequence, a stop string of the
recipe or the environment, or the per-turn cap), the loop hands the turn to `Episodes.handover`
(rows that end at the same step are handed over together, so their tool calls run in parallel).
An observation's tokens are then fed to that row one per decode step in place of a drawn token
(teacher forcing through the same stepper and cache), so nothing already decoded is read again;
their log-probs are written as 0.0 and the row's next policy turn starts after them. Rows that
are done leave the batch and the cache, as in the one-turn loop.

Stop strings are matched only inside the current policy turn (an observation that contains one
does not end the next turn).
"""

from __future__ import annotations

from collections import deque

import torch

from rollout.base import SamplingParams, progress
from rollout.hf.sampling import RaceNoise, draw, sampling_logprobs
from rollout.hf.stops import StopChecker
from rollout.turns import Episodes


def _turn_end(tokens: list[int], token: int, stopper: StopChecker, stop_ids: set[int], eos: int | None,
              budget: int) -> str | None:
    """Why the policy turn `tokens` (its last entry is `token`) ends, or None."""
    if token in stop_ids:
        return "eos" if token == eos else "stop"
    if stopper.text_stops:
        tail = stopper.tokenizer.decode(tokens[-stopper.tail_tokens:], skip_special_tokens=False)
        if any(s in tail for s in stopper.text_stops):
            return "stop"
    if len(tokens) >= budget:
        return "length"
    return None


def sample_turns(stepper, logits: torch.Tensor, sampling: SamplingParams, stopper: StopChecker, noise: RaceNoise,
                 out, episodes: Episodes) -> None:
    """Decode `out.tokens.shape[0]` rows turn by turn, writing tokens, log-probs and lengths to `out`
    (a `rollout.hf.engine._Decoded`); `episodes` records the turns and the finish reasons."""
    batch, max_new = out.tokens.shape
    device = out.tokens.device
    stop_ids = set(stopper.stop_ids.tolist()) if stopper.stop_ids is not None else set()
    eos = None if sampling.ignore_eos else stopper.tokenizer.eos_token_id
    alive = list(range(batch))
    forced: list[deque[int]] = [deque() for _ in range(batch)]
    turn: list[list[int]] = [[] for _ in range(batch)]  # the current policy turn of each row
    budget = [episodes.turn_budget(b) for b in range(batch)]
    for t in range(max_new):
        progress()
        index = torch.tensor(alive, device=device)  # [A]
        lp = sampling_logprobs(logits, sampling)  # [A, V]
        token = draw(lp, sampling, noise, index)  # [A]
        token_lp = lp.gather(-1, token[:, None]).squeeze(-1)  # [A]
        drawn = token.tolist()
        ended = []
        for i, row in enumerate(alive):
            if forced[row]:  # an observation token: context, not sampled
                token[i], token_lp[i] = forced[row].popleft(), 0.0
                if not forced[row]:
                    budget[row] = episodes.turn_budget(row)
                continue
            turn[row].append(drawn[i])
            why = _turn_end(turn[row], drawn[i], stopper, stop_ids, eos, budget[row])
            if why is None and t == max_new - 1:
                why = "length"
            if why is not None:
                ended.append((row, turn[row], why))
        out.tokens[index, t], out.token_lps[index, t] = token, token_lp
        if ended:
            keep_rows = set(alive)
            for (row, _, _), obs in zip(ended, episodes.handover(ended)):
                turn[row] = []
                if obs is None:
                    out.lengths[row] = t + 1
                    keep_rows.discard(row)
                else:
                    forced[row].extend(obs)
            keep = [i for i, row in enumerate(alive) if row in keep_rows]
            if not keep:
                return
            if len(keep) < len(alive):
                alive = [alive[i] for i in keep]
                keep_t = torch.tensor(keep, device=device)
                token = token[keep_t]
                stepper.select(keep_t)
        if t == max_new - 1:
            break
        logits, _ = stepper.step(token)
