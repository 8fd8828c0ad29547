"""The vLLM engines' multi-turn loop: each round resubmits the live rows' whole sequences.

vLLM keeps no per-request state between `generate` calls, but its prefix cache keeps the KV blocks
of what it computed: a row resubmitted as prompt + completion so far + observation finds every
full block of its past in the cache and computes only the new tail (the observation and the next
turn). Requests are token ids, so the sequence is exactly the tokens sampled and fed so far, never
re-tokenized text. A round hands every ended turn to `Episodes.handover` at once (their tool calls
run in parallel).

`submit(contexts, budgets, seeds)` is the engine's: one request per context with `max_tokens` from
`budgets`, returning one-completion `Rollout`s (token ids, log-probs, finish reason) in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rollout.base import Rollout
from rollout.turns import Episodes

Submit = Callable[[list[list[int]], list[int], list[int | None]], list[Rollout]]


def run_turns(submit: Submit, rows: Sequence[Sequence[int]], n: int, episodes: Episodes, eos: int | None,
              row_seeds: Sequence[int] | None) -> list[Rollout]:
    """Multi-turn rollouts of `rows` (the prompt of each completion, prompt-major, n per prompt)."""
    logprobs: list[list[float]] = [[] for _ in rows]
    live = list(range(len(rows)))
    turn = 0
    while live:
        contexts = [list(rows[b]) + list(episodes.rows[b].ids) for b in live]
        seeds = [None if row_seeds is None else (row_seeds[b] * 7919 + turn) % 2**31 for b in live]
        outs = submit(contexts, [episodes.turn_budget(b) for b in live], seeds)
        ended = []
        for b, out in zip(live, outs):
            ids = list(out.completion_ids)
            logprobs[b].extend(out.logprobs)
            if out.finish_reason == "length":
                why = "length"
            elif eos is not None and ids and ids[-1] == eos:
                why = "eos"
            else:
                why = "stop"
            ended.append((b, ids, why))
        next_live = []
        for (b, _, _), obs in zip(ended, episodes.handover(ended)):
            if obs is not None:
                logprobs[b].extend([0.0] * len(obs))
                next_live.append(b)
        live = next_live
        turn += 1
    return [Rollout(group=b // n, prompt_ids=tuple(rows[b]), logprobs=tuple(logprobs[b]), **episodes.completion(b))
            for b in range(len(rows))]
