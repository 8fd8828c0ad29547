"""Requests and outputs: `SamplingParams` -> vLLM's keyword arguments, and vLLM's answers -> `Rollout`s.

Both engines use these: `to_vllm_sampling_kwargs` (vLLM's `SamplingParams`, also the completions
API's body fields), `filter_engine_kwargs` (the `EngineArgs` this vLLM accepts), and the conversion
of a `RequestOutput` (colocated) or a `/v1/completions` JSON response (server) into rollouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from rollout.base import Rollout, SamplingParams

__all__ = [
    "to_vllm_sampling_kwargs",
    "filter_engine_kwargs",
    "request_output_to_rollouts",
    "completion_response_to_rollouts",
]


# ---------------------------------------------------------------------------------------------
# Sampling parameters and engine arguments
# ---------------------------------------------------------------------------------------------


def to_vllm_sampling_kwargs(sampling: SamplingParams, n: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (also the body fields of the completions API).

    Our `top_k=0` ("off") becomes vLLM's -1, which every vLLM version accepts as "off" (recent ones
    also accept 0). `logprobs=0` asks for the logprob of the sampled token only. Stop strings are
    kept in the text (`include_stop_str_in_output`), as the transformers engine does.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
        "max_tokens": int(sampling.max_new_tokens),
        "stop": list(sampling.stop),
        "stop_token_ids": list(sampling.stop_token_ids),
        "include_stop_str_in_output": True,
        "ignore_eos": bool(sampling.ignore_eos),
        "logprobs": 0,
    }
    if sampling.seed is not None:
        kwargs["seed"] = int(sampling.seed)  # engines spread it per request (`request_seeds`)
    return kwargs


def filter_engine_kwargs(kwargs: Mapping[str, Any], accepted: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Split engine arguments into those this vLLM version accepts and those it does not.

    vLLM renames and adds `EngineArgs` fields between releases; dropping an unknown optional one
    (with a warning) beats a TypeError deep inside `LLM.__init__`.
    """
    accepted = set(accepted)
    kept = {k: v for k, v in kwargs.items() if k in accepted}
    dropped = sorted(k for k in kwargs if k not in accepted)
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Outputs -> Rollout
# ---------------------------------------------------------------------------------------------

_FINISH = {"stop": "stop", "length": "length"}


def _finish_reason(reason: str | None) -> str:
    if reason not in _FINISH:
        raise RuntimeError(f"vLLM finished a completion with reason {reason!r} (aborted or unfinished)")
    return _FINISH[reason]


def _sampled_logprob(entry: Any, token_id: int) -> float:
    """The logprob of `token_id` in one position of vLLM's sample logprobs.

    A position is a mapping token id -> `Logprob` (with `.logprob`) in both the list-of-dicts and
    the `FlatLogprobs` containers; with `logprobs=0` it holds only the sampled token.
    """
    value = entry[token_id]
    return float(getattr(value, "logprob", value))


def _routing_tensor(routed: Any, num_tokens: int) -> torch.Tensor:
    """vLLM's routed experts -> int tensor [num_tokens, layers, top_k].

    vLLM returns one row per token that went through the model, i.e. all but the last sampled token
    (up to 0.1x: `Scheduler._get_routed_experts`; 0.32: chunks from the aux-output connector,
    concatenated per request by the `OutputProcessor` into `CompletionOutput.routed_experts`). The
    last token's routing never influences a logprob the trainer uses, so its row is filled with -1.
    Any other length (e.g. rows missing for prefix-cached prompt tokens) is an error, never a guess.
    """
    experts = torch.as_tensor(routed).to(torch.int64)  # [T or T-1, L, K]
    if experts.dim() != 3:
        raise ValueError(f"routed experts must be [tokens, layers, top_k], got {tuple(experts.shape)}")
    missing = num_tokens - experts.shape[0]
    if missing < 0 or missing > 1:
        raise ValueError(f"routed experts cover {experts.shape[0]} tokens for a sequence of {num_tokens}")
    if missing:
        pad = torch.full((missing, *experts.shape[1:]), -1, dtype=experts.dtype)
        experts = torch.cat([experts, pad])
    return experts


def request_output_to_rollouts(output: Any, group: int, *, record_routing: bool = False) -> list[Rollout]:
    """One vLLM `RequestOutput` (duck-typed) -> its `n` rollouts, all with `group`.

    Reads `output.prompt_token_ids` and, for each `output.outputs[j]` (sorted by `.index`),
    `token_ids`, `text`, `logprobs` (one mapping per token), `finish_reason` and, when routing is
    recorded, `routed_experts`.
    """
    prompt_ids = tuple(int(t) for t in output.prompt_token_ids)
    rollouts = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        ids = tuple(int(t) for t in completion.token_ids)
        if completion.logprobs is None:
            raise RuntimeError("vLLM returned no logprobs; the request must set logprobs=0")
        if len(completion.logprobs) != len(ids):
            raise RuntimeError(f"{len(completion.logprobs)} logprob positions for {len(ids)} tokens")
        logprobs = tuple(_sampled_logprob(entry, tok) for entry, tok in zip(completion.logprobs, ids))
        routed = None
        if record_routing:
            raw = getattr(completion, "routed_experts", None)
            if raw is None:
                raise RuntimeError(
                    "routing was requested but vLLM returned none; build the engine with "
                    "enable_return_routed_experts=True"
                )
            routed = _routing_tensor(raw, len(prompt_ids) + len(ids))
        rollouts.append(
            Rollout(
                group=group,
                prompt_ids=prompt_ids,
                completion_ids=ids,
                text=completion.text,
                logprobs=logprobs,
                finish_reason=_finish_reason(completion.finish_reason),
                routed_experts=routed,
            )
        )
    return rollouts


def _choice_token_ids(choice: Mapping[str, Any]) -> list[int]:
    """Completion token ids of one choice of vLLM's completions API response."""
    if choice.get("token_ids") is not None:  # `return_token_ids=true` (vLLM >= 0.10.2)
        return [int(t) for t in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens")  # `return_tokens_as_token_ids=true`
    if tokens is None:
        raise RuntimeError("the completions response carries no token ids")
    return [int(t.removeprefix("token_id:")) for t in tokens]


def completion_response_to_rollouts(
    response: Mapping[str, Any], prompts: Sequence[Sequence[int]], n: int
) -> list[Rollout]:
    """vLLM's `/v1/completions` JSON for `len(prompts)` token prompts x `n` -> prompt-major rollouts.

    vLLM numbers the choices `index = prompt * n + j` (`serving_completion.py`); the sampled tokens'
    logprobs are in `choices[k].logprobs.token_logprobs`.
    """
    choices = sorted(response["choices"], key=lambda c: c["index"])
    if len(choices) != len(prompts) * n:
        raise RuntimeError(f"expected {len(prompts) * n} choices, got {len(choices)}")
    rollouts = []
    for choice in choices:
        group = choice["index"] // n
        ids = _choice_token_ids(choice)
        logprobs = [float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or []]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"{len(logprobs)} logprobs for {len(ids)} tokens in choice {choice['index']}")
        rollouts.append(
            Rollout(
                group=group,
                prompt_ids=tuple(int(t) for t in prompts[group]),
                completion_ids=tuple(ids),
                text=choice.get("text", ""),
                logprobs=tuple(logprobs),
                finish_reason=_finish_reason(choice.get("finish_reason")),
            )
        )
    return rollouts
