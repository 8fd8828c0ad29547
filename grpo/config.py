"""The typed recipe: one validated tree (model, data, rollout, algorithm, rewards, trainer, moe, eval,
logging).

A recipe is YAML. Every field below has a one-line doc and its default; defaults live here only.
Unknown keys are errors naming the file and the dotted key. Command-line overrides `a.b=value`
are parsed as YAML scalars and applied before validation, so they are checked like the file.

    cfg = load_recipe("recipes/tiny-cpu.yaml", ["trainer.steps=50"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe problem, phrased for a person: `file: dotted.key: what is wrong`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        "builtin:tiny-arith-moe",
        description="`builtin:NAME` (a tiny base pretrained locally and cached), a Hub id or a local directory",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub repository")
    attn_implementation: str | None = Field(None, description="transformers attention kernel (sdpa, flash_attention_2, eager)")
    experts_implementation: str | None = Field(
        None, description="transformers MoE expert kernel (eager, grouped_mm); None picks per device"
    )


class ArithmeticOptions(Section):
    max_first: int = Field(99, ge=1, le=100_000, description="the first operand is drawn from [0, max_first]")
    max_second: int = Field(9, ge=1, le=100_000, description="the second operand is drawn from [0, max_second]")
    ops: list[Literal["+", "-"]] = Field(["+"], min_length=1, description="operators to draw from")


class DataConfig(Section):
    source: Literal["arithmetic"] = Field("arithmetic", description="where prompts come from (a built-in task)")
    template: str = Field("r1_zero_tiny", description="prompt template name (see grpo.data.TEMPLATES)")
    arithmetic: ArithmeticOptions = Field(default_factory=ArithmeticOptions, description="options of the arithmetic task")
    seed: int = Field(0, description="seed of the train/held-out split and of prompt shuffling")


class RolloutConfig(Section):
    engine: Literal["hf"] = Field("hf", description="rollout engine: hf (transformers)")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (G); GRPO needs at least 2")
    max_new_tokens: int = Field(24, ge=1, description="completion length cap in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 disables)")
    stop: list[str] = Field(["</answer>"], description="stop strings, kept in the completion")


class AlgorithmConfig(Section):
    advantage_scale: Literal["group", "none"] = Field(
        "group", description="divide group-centred rewards by the group std (GRPO) or not (Dr. GRPO)"
    )
    clip_low: float = Field(0.2, ge=0, le=1, description="lower ratio clip epsilon: ratio >= 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="upper ratio clip epsilon: ratio <= 1 + clip_high")
    loss_agg: Literal["token_mean", "seq_mean"] = Field(
        "token_mean", description="token_mean over the global batch (DAPO) or per-sequence mean then mean (GRPO)"
    )
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each batch of rollouts")


class RewardFunction(Section):
    name: str = Field(description="built-in name, `package.module:function`, or an entry point of `grpo_zero.rewards`")
    weight: float = Field(1.0, description="weight in the total reward")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the function")


class RewardsConfig(Section):
    functions: list[RewardFunction] = Field(
        default_factory=lambda: [RewardFunction(name="math_answer"), RewardFunction(name="format", weight=0.5)],
        min_length=1,
        description="reward functions and weights",
    )
    workers: int = Field(2, ge=0, description="reward worker processes (0 scores in-process, for debugging)")
    timeout_s: float = Field(2.0, gt=0, description="per-item wall-clock deadline")
    memory_mb: int = Field(1024, ge=64, description="address-space limit of each worker")
    timeout_score: float = Field(0.0, description="score of an item that hit the deadline")
    error_score: float = Field(0.0, description="score of an item whose reward function raised")
    fail_fast: bool = Field(False, description="stop the run at the first reward error instead of counting it")


class TrainerConfig(Section):
    steps: int = Field(300, ge=1, description="optimizer steps (one batch of rollouts each)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step; each gets group_size completions")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward (gradient accumulation above it)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps (constant after)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip")
    seed: int = Field(0, description="seed of sampling and initialisation (ranks derive theirs from it)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (None: torch's default)")
    save_every: int = Field(0, ge=0, description="write a checkpoint to OUTPUT_DIR/checkpoints every N steps (0: never)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the oldest are deleted)")
    max_consecutive_skips: int = Field(
        3, ge=1, description="stop the run after this many consecutive steps with a non-finite loss or grad norm"
    )


class MoEConfig(Section):
    aux_loss_coef: float = Field(
        0.0, ge=0, description="router load-balancing loss weight (Switch-style); 0 for RL, as peers found it hurts"
    )
    router_float32: bool = Field(False, description="compute router logits and top-k weights in float32")
    routing_replay: Literal["none", "R2", "R3"] = Field(
        "none",
        description="train with recorded experts: R2 = those of the old-logprob forward, R3 = those the sampler used",
    )
    metrics: bool = Field(True, description="log per-layer expert load under moe/ each step (MoE models only)")


class EvalConfig(Section):
    num_prompts: int = Field(200, ge=1, description="held-out prompts, never used for training")
    before_and_after: bool = Field(True, description="greedy accuracy before the first and after the last step")
    max_new_tokens: int | None = Field(None, ge=1, description="generation cap (None: rollout.max_new_tokens)")


class LoggingConfig(Section):
    rollouts_every: int = Field(10, ge=1, description="write every rollout of each N-th step under rollouts/")
    report_to: list[str] = Field(default_factory=list, description="experiment trackers besides metrics.jsonl")
    project: str = Field("grpo-zero", description="tracker project name")
    run_name: str | None = Field(None, description="tracker run name (None: the output directory's name)")
    progress: bool = Field(True, description="show a progress bar")


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.algorithm.clip_high < self.algorithm.clip_low:
            raise ValueError("algorithm.clip_high must be >= algorithm.clip_low (clip-higher never clips tighter)")
        return self

    @field_validator("logging")
    @classmethod
    def _known_trackers(cls, value: LoggingConfig) -> LoggingConfig:
        unknown = set(value.report_to) - {"wandb", "tensorboard", "mlflow", "trackio"}
        if unknown:
            raise ValueError(f"logging.report_to: unknown tracker(s) {sorted(unknown)}")
        return value


# --- loading ----------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {'.'.join(keys[: i + 1])}: cannot descend into a {type(node).__name__}")
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{source}: {dotted}: cannot set a key inside a {type(node).__name__}")


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"] if p != "__root__") or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    got = error.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    message = error["msg"]
    return f"{where}: {message} (got {shown})" if where != "(top level)" else message


def parse_recipe_dict(raw: Any, source: str) -> RunConfig:
    if raw is None:
        raise ConfigError(f"{source}: the recipe is empty (expected a mapping of sections)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_describe(first)}{more}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a recipe. Raises ConfigError with one readable line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raise ConfigError(f"{path}: the recipe is empty (expected a mapping of sections)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. trainer.steps=50)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value, f"override {item!r}")
    return parse_recipe_dict(raw, str(path))


def dump_config(cfg: RunConfig) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
