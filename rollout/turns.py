"""Multi-turn rollouts: a completion is policy turns and environment turns.

The environment interface (an environment is any object with these; no base class):

    stop: tuple[str, ...]                 # strings that end a policy turn and hand it over
    reset(example: dict) -> state         # per-rollout state (anything), from the data row
    step(turns: list[str], state) -> Observation | str | None
    close() -> None

`turns` is the completion so far as alternating texts, policy first (policy, environment,
policy, ...; the last is the policy turn that just ended). `step` returns the next observation
(text the policy reads as context; an `Observation` also says whether it was a tool call and its
status, and may carry a reward), or None, or an `Observation` with `done=True`: the episode is
done (a done observation's text is not fed, its reward counts). The rewards an environment gives
add up per rollout (`Rollout.env_reward`, None when it gave none), which the built-in reward
`environment` returns. Environments are named in a recipe like rewards are (a
built-in name, `package.module:function`, an entry point of `grpo_zero.environments`); the name
resolves to a factory called with the recipe's kwargs (`grpo.run.tools`).

`Episodes` holds the state of one batch of rows (one per completion) and decides, the same way for
every engine, what happens when a policy turn ends (`handover`):

- a turn ended by the end-of-sequence token ends the rollout (finish reason "stop");
- a turn ended by a stop string goes to the environment; "done" ends the rollout ("stop");
- otherwise the observation is tokenized (cut at `max_observation_tokens`) and fed to the engine,
  which continues the sequence from its cache;
- limits: a turn that reaches `max_turn_tokens`, a tool call after `max_turns` policy turns, an
  observation that leaves no room for one more policy token inside `max_new_tokens` (policy and
  environment tokens together), all end the rollout with finish reason "length".

The truncation rule for the reward: a rollout a limit ended is "length"-finished exactly like a
one-turn completion that hit its cap (rewards see finish_reason; `algorithm.overlong_filter` masks
it, `algorithm.overlong_buffer` penalises it by its policy tokens). Rewards score the whole
transcript, tool outputs included.

Environment tokens are context: `policy_mask` marks them False; their log-probs are 0.0 and no
loss, ratio, KL, entropy or length metric counts them (`grpo.algo.update.collate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

TurnEnd = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Observation:
    """An environment turn: its text; whether it answers a tool call, and that call's status
    (`rollout.tools.sandbox.STATUSES`), counted in the tool metrics."""

    text: str
    tool_call: bool = True
    status: str = "ok"
    reward: float | None = None  # the environment's reward for the turn that led here (None: none)
    done: bool = False  # the episode ends here: the text is not fed, the reward counts


@runtime_checkable
class Environment(Protocol):
    stop: tuple[str, ...]

    def reset(self, example: dict) -> Any: ...

    def step(self, turns: list[str], state: Any) -> Observation | str | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TurnLimits:
    max_turns: int = 4
    max_turn_tokens: int | None = None
    max_observation_tokens: int = 256


@dataclass
class _Row:
    state: Any
    ids: list[int] = field(default_factory=list)  # the completion so far (policy and environment)
    mask: list[bool] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # alternating policy / environment texts
    env_turns: list[tuple[int, int, str]] = field(default_factory=list)
    turns: int = 0
    finish: str | None = None
    env_reward: float | None = None  # the sum of the environment's rewards (None: it gave none)

    def add_reward(self, obs: Observation | None) -> None:
        if obs is not None and obs.reward is not None:
            self.env_reward = (self.env_reward or 0.0) + float(obs.reward)


class Episodes:
    """Multi-turn state of `len(examples)` rows (row b: the b-th completion, prompt-major).

    Engines call `handover` whenever policy turns end and feed back what it returns; then read
    each row's result with `completion`.
    """

    def __init__(self, env: Environment, tokenizer, limits: TurnLimits, examples: Sequence[dict],
                 max_new_tokens: int, workers: int = 8):
        self.env, self.tokenizer, self.limits = env, tokenizer, limits
        self.max_new_tokens = max_new_tokens
        self.rows = [_Row(env.reset(dict(example))) for example in examples]
        self.workers = workers

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.env.stop)

    def __len__(self) -> int:
        return len(self.rows)

    def turn_budget(self, row: int) -> int:
        """Tokens the current policy turn of `row` may still take (turn cap and total cap)."""
        used = len(self.rows[row].ids)
        left = self.max_new_tokens - used
        return max(0, min(left, self.limits.max_turn_tokens or left))

    def handover(self, ended: list[tuple[int, list[int], TurnEnd]]) -> list[list[int] | None]:
        """Policy turns ended: (row, the turn's tokens, why). Returns, per item, the observation tokens
        to feed, or None: the row is finished (`completion` says how)."""
        asks = []
        for row, ids, why in ended:
            r = self.rows[row]
            r.ids.extend(ids)
            r.mask.extend([True] * len(ids))
            r.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            r.turns += 1
            if why != "stop":
                r.finish = "stop" if why == "eos" else "length"
            elif len(r.ids) >= self.max_new_tokens:
                r.finish = "length"
            else:
                asks.append(row)
        answers = self._step(asks)
        out: list[list[int] | None] = []
        for row, _, _ in ended:
            r = self.rows[row]
            if r.finish is not None:
                out.append(None)
                continue
            obs = answers[row]
            r.add_reward(obs)
            if obs is None or obs.done:
                r.finish = "stop"
                out.append(None)
                continue
            if r.turns >= self.limits.max_turns:  # a call the turn limit leaves unanswered
                r.finish = "length"
                out.append(None)
                continue
            ids = self.tokenizer.encode(obs.text, add_special_tokens=False)[: self.limits.max_observation_tokens]
            if len(r.ids) + len(ids) >= self.max_new_tokens:  # no room for the policy's next token
                r.finish = "length"
                out.append(None)
                continue
            r.env_turns.append((len(r.ids), len(r.ids) + len(ids), obs.status if obs.tool_call else ""))
            r.ids.extend(ids)
            r.mask.extend([False] * len(ids))
            r.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            out.append(ids)
        return out

    def _step(self, rows: list[int]) -> dict[int, Observation | None]:
        def one(row: int) -> Observation | None:
            r = self.rows[row]
            got = self.env.step(list(r.texts), r.state)
            return Observation(got, tool_call=False) if isinstance(got, str) else got

        if len(rows) <= 1:
            return {row: one(row) for row in rows}
        with ThreadPoolExecutor(min(self.workers, len(rows))) as ex:
            return dict(zip(rows, ex.map(one, rows)))

    def completion(self, row: int) -> dict[str, Any]:
        """The Rollout fields of a finished row: completion_ids, policy_mask, env_turns, turns,
        env_reward, finish_reason, text."""
        r = self.rows[row]
        return {"completion_ids": tuple(r.ids), "policy_mask": tuple(r.mask), "env_turns": tuple(r.env_turns),
                "turns": r.turns, "env_reward": r.env_reward, "finish_reason": r.finish or "length",
                "text": self.tokenizer.decode(r.ids, skip_special_tokens=True)}
