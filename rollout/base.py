"""The `Rollout` record and the rollout-engine Protocol.

One `Rollout` travels between the stages of a GRPO step (generate -> score -> advantages ->
update). Stages return new records (`dataclasses.replace`) instead of mutating shared ones.

An engine is anything with `generate`, `update_weights`, the two phase hooks `before_update` /
`after_update` (an engine that shares the accelerator with the trainer frees its memory in the
first) and `close`. Engines do not inherit from a base class; they satisfy the Protocol
structurally. `find_routers` is the one definition of "an MoE router" that the engines (recording
routed experts) and the trainer (routing replay, expert-load metrics) share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Mirrors the subset of vLLM's `SamplingParams` RL needs."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop: tuple[str, ...] = ()  # stop strings, kept in the completion (e.g. "</answer>")
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the tokenizer's EOS
    ignore_eos: bool = False  # keep sampling through EOS (benchmarks with fixed lengths)
    seed: int | None = None
    # One seed per prompt: each completion then draws from its own generator (seeded by its
    # prompt's seed and its index in the group), so what a prompt samples does not depend on the
    # other prompts in the batch (1 process and N processes sample the same rollouts).
    prompt_seeds: tuple[int, ...] = ()
    record_routing: bool = False  # capture the experts each token was routed to (MoE)


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt, and what later stages learned about it.

    `group` is the index of the prompt in the batch passed to `generate`; the `n` completions of
    one prompt share it and are normalised together.
    """

    group: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    text: str  # decoded completion (untrusted model text)
    logprobs: tuple[float, ...]  # sampler log-probabilities of completion_ids, one per token
    finish_reason: FinishReason
    # MoE only, when captured: int tensor [prompt_len + completion_len, num_layers, top_k] of the
    # experts the sampler routed each token to. None when not recorded.
    routed_experts: torch.Tensor | None = None
    example: dict = field(default_factory=dict)  # the data row (gold answer, metadata)
    rewards: dict[str, float | None] = field(default_factory=dict)  # per reward function
    reward: float = 0.0  # weighted total
    advantage: float = 0.0
    policy_version: int = 0  # optimizer steps taken by the weights that sampled it (set by the trainer)
    # Multi-turn rollouts (`rollout.turns`): which completion tokens the policy sampled (True) and
    # which an environment wrote (False: context, never trained on; their `logprobs` entries are 0.0
    # and mean nothing). None: a one-turn rollout, every token the policy's.
    policy_mask: tuple[bool, ...] | None = None
    # the environment turns as (first token, end token, tool status) spans of completion_ids
    env_turns: tuple[tuple[int, int, str], ...] = ()
    turns: int = 1  # policy turns
    env_reward: float | None = None  # the sum of the environment's rewards (None: none given, or one turn)

    @property
    def num_completion_tokens(self) -> int:
        """Tokens the policy sampled (environment tokens are context and do not count)."""
        if self.policy_mask is None:
            return len(self.completion_ids)
        return sum(self.policy_mask)

    @property
    def tool_calls(self) -> int:
        return sum(1 for _, _, status in self.env_turns if status)

    def tool_count(self, *statuses: str) -> int:
        """Environment turns whose tool status is one of `statuses` (e.g. "error", "timeout")."""
        return sum(1 for _, _, status in self.env_turns if status in statuses)


_progress_hook: Callable[[], None] | None = None


def set_progress_hook(hook: Callable[[], None] | None) -> None:
    """`hook()` is called as an engine makes progress inside one generate call (the transformers
    engine: every decode step), so that a watchdog can tell a long generation from a hung one."""
    global _progress_hook
    _progress_hook = hook


def progress() -> None:
    """An engine made progress (see `set_progress_hook`)."""
    if _progress_hook is not None:
        _progress_hook()


@runtime_checkable
class RolloutEngine(Protocol):
    """What the training loop needs from a generator."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, episodes=None
    ) -> list[Rollout]:
        """Sample `n` completions for each prompt (token ids).

        Returns `len(prompts) * n` rollouts ordered prompt-major: rollout `i * n + j` is the
        j-th completion of prompt i, with `group == i`. With `episodes` (`rollout.turns.Episodes`,
        one row per completion) a completion is policy turns and environment turns: the engine
        continues each sequence after an environment turn without re-reading it.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights, named as in the transformers model's `state_dict`."""
        ...

    def before_update(self) -> None:
        """The policy update starts (a colocated engine may release its device memory)."""
        ...

    def after_update(self) -> None:
        """The update ended and the new weights were pushed (the engine may take memory back)."""
        ...

    def close(self) -> None: ...


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k router of every MoE layer of a transformers model, in layer order (empty for a
    dense model): the `mlp.gate` modules that carry `top_k`, `num_experts` and a weight."""
    return [m for name, m in model.named_modules()
            if name.endswith("mlp.gate") and hasattr(m, "top_k") and hasattr(m, "num_experts") and hasattr(m, "weight")]
