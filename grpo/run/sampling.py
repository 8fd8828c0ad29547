"""The sampling half of a step: draw this rank's prompts, sample G completions of each, score them.

    batch = collect_rollouts(ctx, step)     PromptGroup records -> engine.generate -> rewards; DAPO's
                                            dynamic sampling draws more rounds when it is on

Records flow one way: a `PromptGroup` carries a prompt (its row, rendered text, token ids,
sampling seed and global index) through the step; the `Rollout`s it produces index their group
with `Rollout.group`; a `RolloutBatch` is what the learning half (`grpo.run.step.learn`) receives,
in the trainer's process or, under asynchronous RL, from the generation process.

Seeds: group i of sampling round r of step s samples with `group_seed(seed, s, first + i, r)`,
where `first` is this rank's first global prompt index, so a group samples the same completions
whichever rank (and however many) sample it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from grpo.algo.dynamic_sampling import sample_batch
from grpo.collectives import group_seed
from grpo.config import RolloutConfig, RunConfig
from grpo.data.prompts import PromptSampler, correct_rewards, longest_prompt_tokens, render_prompts
from grpo.phases import phase
from grpo.run.tools import episodes_for, make_environment
from rewards import RewardSpec, Scorer
from rollout.base import Rollout, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class PromptGroup:
    """One prompt of a step and everything the step needs about it."""

    index: int  # global index of the prompt in the step's batch (over every rank)
    row: dict  # the data row (gold answer, metadata)
    text: str  # the rendered prompt
    token_ids: tuple[int, ...]
    seed: int  # the sampling seed of its G completions


@dataclass(frozen=True)
class RolloutBatch:
    """This rank's scored groups of one step; `rollouts[i].group` indexes `groups`."""

    groups: tuple[PromptGroup, ...]
    rollouts: list[Rollout]
    metrics: dict[str, float]  # reward metrics (of the first round) and dynamic-sampling metrics
    generate_s: float  # drawing, encoding and sampling
    score_s: float
    policy_version: int = 0  # optimizer steps taken by the weights that sampled it
    generation_wait_s: float = 0.0  # asynchronous RL: the generation side waited this long for those weights
    update_wait_s: float = 0.0  # asynchronous RL: the trainer waited this long for this batch


@dataclass
class SamplingContext:
    """What the rollout half works with: where prompts come from, the engine that samples them and the
    rewards that score them. Built once per run, by the trainer (synchronous RL), by the generation
    process (asynchronous RL) or by a benchmark."""

    cfg: RunConfig
    engine: RolloutEngine  # samples the completions
    scorer: Scorer
    tokenizer: object
    prompts: PromptSampler
    batch: slice = field(default_factory=lambda: slice(0, None))  # this rank's share of the global prompts
    sampling: SamplingParams | None = None  # None: from cfg.rollout (a benchmark may set ignore_eos)
    environment: object | None = None  # multi-turn rollouts (rollout.turns); None: from cfg.rollout.tools
    hide: tuple[str, ...] = ()  # directories the python tool's sandbox must not show (the run directory)

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = sampling_params(self.cfg.rollout)
        if self.environment is None and self.cfg.rollout.tools.environment is not None:
            self.environment = make_environment(self.cfg.rollout.tools, list(self.hide))

    def close_environment(self) -> None:
        """Stop the environment (the python tool's sandbox workers), if there is one."""
        if self.environment is not None and hasattr(self.environment, "close"):
            self.environment.close()

    def episodes(self, groups: list[PromptGroup], max_new_tokens: int):
        """The multi-turn state of one generate call over `groups` (None: one-turn rollouts)."""
        if self.environment is None:
            return None
        return episodes_for(self.cfg.rollout, self.environment, self.tokenizer, [g.row for g in groups],
                            self.cfg.rollout.group_size, max_new_tokens)


def sampling_params(rollout: RolloutConfig, prompt_seeds: list[int] = (), record_routing: bool = False) -> SamplingParams:
    """The recipe's sampling settings; `record_routing` asks the engine for the experts it chose."""
    return SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
                          top_k=rollout.top_k, stop=tuple(rollout.stop), prompt_seeds=tuple(prompt_seeds),
                          record_routing=record_routing)


def engine_lengths(cfg: RunConfig, tokenizer, *row_sets: list[dict]) -> dict[str, int]:
    """`make_engine`'s longest_prompt and max_new_tokens for an engine that will be given prompts of
    `row_sets` (training, evaluation) and asked for rollout or evaluation completions. Measured
    (every prompt rendered and encoded) only for the colocated vLLM engine with
    `rollout.vllm.max_model_len` unset, which sizes its context and KV cache from them; {} otherwise."""
    r = cfg.rollout
    if r.engine != "vllm" or r.vllm.mode != "colocate" or r.vllm.max_model_len is not None:
        return {}
    rows = [row for rows in row_sets for row in rows]
    return {"longest_prompt": longest_prompt_tokens(cfg.data, rows, tokenizer),
            "max_new_tokens": max(r.max_new_tokens, cfg.eval.max_new_tokens or r.max_new_tokens)}


def prompt_groups(ctx: SamplingContext, rows: list[dict], step: int, sampling_round: int) -> list[PromptGroup]:
    """Render and encode `rows` once; group i gets its seed for `sampling_round` of `step`."""
    first = ctx.batch.start or 0
    texts = render_prompts(ctx.cfg.data, rows, ctx.tokenizer)
    return [PromptGroup(index=first + i, row=row, text=text,
                        token_ids=tuple(ctx.tokenizer.encode(text, add_special_tokens=False)),
                        seed=group_seed(ctx.cfg.trainer.seed, step, first + i, sampling_round))
            for i, (row, text) in enumerate(zip(rows, texts))]


def make_scorer(cfg: RunConfig) -> Scorer:
    """The training rewards; a reward that `eval.correct` names and the recipe does not train on
    is scored too, with weight 0, so that `rollout/accuracy` means what evaluation means."""
    r = cfg.rewards
    specs = [RewardSpec(f.name, f.weight, r.kwargs_for(f.name, f.kwargs)) for f in r.functions]
    specs += [RewardSpec(name, 0.0, r.kwargs_for(name)) for name in correct_rewards(cfg.data, cfg.eval)
              if name not in {f.name for f in r.functions}]
    return Scorer(specs, workers=r.workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb, fail_fast=r.fail_fast)


def score_rollouts(scorer: Scorer, rollouts: list[Rollout], groups: list[PromptGroup],
                   max_tokens: int) -> tuple[list[Rollout], dict[str, float]]:
    """Attach per-function rewards and the weighted total to every rollout. A sample is named
    `prompt P completion J (#I)`: P the prompt's global index in the step, J the completion's in its
    group, I the sample's in this call."""
    seen: dict[int, int] = {}
    contexts = []
    for i, r in enumerate(rollouts):
        j = seen[r.group] = seen.get(r.group, -1) + 1
        contexts.append({"prompt": groups[r.group].text, "finish_reason": r.finish_reason,
                         "num_tokens": r.num_completion_tokens, "max_tokens": max_tokens,
                         "sample_id": f"prompt {groups[r.group].index} completion {j} (#{i})",
                         **({"env_reward": r.env_reward} if r.env_reward is not None else {})})
    result = scorer.score([r.text for r in rollouts], [groups[r.group].row for r in rollouts], contexts)
    scored = [
        replace(r, example=groups[r.group].row, reward=result.total[i],
                rewards={name: values[i] for name, values in result.per_function.items()})
        for i, r in enumerate(rollouts)
    ]
    return scored, result.metrics


def collect_rollouts(ctx: SamplingContext, step: int, policy_version: int | None = None) -> RolloutBatch:
    """This rank's prompts of `step`, G completions each, scored (more rounds under dynamic sampling).
    `policy_version`: the steps the engine's weights have taken (synchronous: step - 1). The
    completion cap is `rollout.max_new_tokens_at(step)`, the step the batch is sampled for (an
    asynchronous run samples ahead of the trainer), logged as `rollout/max_new_tokens`."""
    cfg, seconds = ctx.cfg, {"generate": 0.0, "score": 0.0}
    new_tokens = cfg.rollout.max_new_tokens_at(step) if cfg.rollout.max_new_tokens_schedule else ctx.sampling.max_new_tokens
    version = step - 1 if policy_version is None else policy_version
    rounds = iter(range(cfg.algorithm.max_sampling_attempts + 1))

    def draw(n: int) -> list[PromptGroup]:
        t = time.perf_counter()
        groups = prompt_groups(ctx, ctx.prompts.next_batch(n)[ctx.batch], step, next(rounds))
        seconds["generate"] += time.perf_counter() - t
        return groups

    def generate_and_score(groups: list[PromptGroup]) -> tuple[list[Rollout], dict[str, float]]:
        t = time.perf_counter()
        sampling = replace(ctx.sampling, prompt_seeds=tuple(g.seed for g in groups), max_new_tokens=new_tokens)
        with phase("generate"):
            episodes = ctx.episodes(groups, new_tokens)
            rollouts = ctx.engine.generate([g.token_ids for g in groups], cfg.rollout.group_size, sampling,
                                           **({"episodes": episodes} if episodes is not None else {}))
        rollouts = [replace(r, policy_version=version) for r in rollouts]
        ts = time.perf_counter()
        with phase("score"):
            scored = score_rollouts(ctx.scorer, rollouts, groups, new_tokens)
        seconds["generate"] += ts - t
        seconds["score"] += time.perf_counter() - ts
        return scored

    groups, rollouts, metrics = sample_batch(generate_and_score, draw, cfg.trainer.prompts_per_step,
                                             dynamic=cfg.algorithm.dynamic_sampling,
                                             max_attempts=cfg.algorithm.max_sampling_attempts)
    first = ctx.batch.start or 0  # kept groups are renumbered: their index is their place in the batch
    groups = tuple(replace(g, index=first + i) for i, g in enumerate(groups))
    metrics = {**metrics, "rollout/max_new_tokens": float(new_tokens)}
    return RolloutBatch(groups, rollouts, metrics, seconds["generate"], seconds["score"], version)
