"""Any recipe at toy scale, on a laptop CPU, with no network: `grpo train RECIPE --toy`.

The run takes the recipe's own code path (its template, rewards, loss, MoE options, engine,
checkpointing and evaluation) with three things replaced:

- the model: a random-init model of the same architecture family, i.e. the same transformers
  `model_type` with the options that change the code that runs (Mixture of Experts with shared
  experts and leading dense layers, multi-head latent attention with or without a query LoRA,
  grouped-query attention, tied embeddings), at widths of 64 and 2 layers (MLA keeps its 512 + 64
  latent, the only one vLLM's CPU kernels run). The family comes from
  the planner's table of known models (`grpo.commands.plan.KNOWN_ARCHS`), a local `config.json`, or the
  Hub cache on this machine (never a download);
- the tokenizer: a byte-level one built here (every text encodes; built-in bases keep theirs);
- the data: local JSON-lines files with the recipe's columns (`prompt_field`, `answer_field`,
  `extra_fields`), for training and for every `eval.datasets` entry, filled with synthetic problems
  whose answers the recipe's rewards can check (countdown problems when the template reads
  `numbers`/`target`, sums otherwise). Synthetic sources (`arithmetic`, `countdown`) stay.

and the scale cut to 2 steps of 2 prompts (`TOY_SCALE`); every cut is printed. Overrides on the
command line are applied after the cuts, so `--toy trainer.steps=5` runs 5 steps. Models and data
are cached under `$GRPO_ZERO_CACHE/toy/` by a hash of what determines them.

    grpo train recipes/qwen3-30b-a3b-zero.yaml --toy --output-dir runs/toy-qwen3
    grpo eval recipes/qwen3-30b-a3b-zero.yaml --toy --checkpoint runs/toy-qwen3/final
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grpo.commands.plan import Arch, resolve_arch
from grpo.config import RunConfig, _set_dotted, apply_overrides, parse_recipe_dict
from grpo.data.tasks import SYNTHETIC_TASKS, ArithmeticTask, CountdownTask

TOY_VERSION = 1  # bump when a toy model or data file changes meaning
TOY_WIDTH = 64
TOY_LAYERS = 2
TOY_HEAD_DIM = 32  # vLLM's CPU attention takes 32, 64, 80, 96, 112, 128 and up
TOY_EXPERTS, TOY_TOP_K = 4, 2
# DeepSeek-V3's group-limited top-k: experts in groups, a token's top-k drawn from its best
# `topk_group` groups (each group scored by its two best experts, so a group needs two or more)
TOY_V3_EXPERTS, TOY_V3_GROUPS, TOY_V3_TOPK_GROUPS = 8, 4, 2
TOY_POSITIONS = 1024  # the R1 template alone is ~420 bytes
TOY_TRAIN_ROWS, TOY_EVAL_ROWS = 64, 4

# key -> value or function of the current value; applied in order, each change printed.
TOY_SCALE: dict[str, Any] = {
    "trainer.steps": 2,
    "data.max_prompt_tokens": lambda v: None if v is None else max(v, TOY_POSITIONS - 64),  # bytes, not BPE tokens
    "trainer.prompts_per_step": 2,
    "trainer.micro_batch_size": lambda v: min(v, 8),
    "trainer.warmup_steps": lambda v: min(v, 1),
    "trainer.save_every": lambda v: 1 if v else 0,  # a recipe that checkpoints writes one per step
    "trainer.threads": lambda v: v or 1,
    "rollout.group_size": lambda v: min(v, 4),
    "rollout.max_new_tokens": lambda v: min(v, 16),
    "rollout.max_new_tokens_schedule": lambda v: None if v is None else [[start, min(t, 16)] for start, t in v],
    "algorithm.mini_batches": lambda v: min(v, 2),  # divides the 2 prompts
    "algorithm.ref_refresh_steps": lambda v: None if v is None else 1,  # refreshed within the 2 steps
    "eval.num_prompts": lambda v: min(v, TOY_EVAL_ROWS),
    "eval.every": lambda v: 1 if v else 0,
    "eval.k": lambda v: min(v, 2),
    "eval.max_new_tokens": lambda v: None if v is None else min(v, 16),
    "rewards.workers": lambda v: min(v, 2),
    "rollout.tools.sandbox.workers": lambda v: min(v, 2),
    "rollout.tools.max_observation_tokens": lambda v: min(v, 8),  # an observation must fit the 16 tokens
    "logging.report_to": [],  # trackers need accounts and the network
    "logging.rollouts_every": 1,
    "launch.accelerate_config": None,  # one process
    "launch.num_machines": None,
    "model.revision": None,
    "model.trust_remote_code": False,
    "rollout.vllm.tensor_parallel_size": 1,
    "rollout.vllm.max_model_len": None,
    "rollout.vllm.max_num_seqs": None,
}


class ToyError(ValueError):
    """A recipe that toy scale cannot reproduce, phrased for a person."""


# --- the architecture family -------------------------------------------------------------------


def source_arch(name_or_path: str) -> Arch:
    """The architecture of the recipe's model, without the network (`grpo.commands.plan.resolve_arch` offline)."""
    try:
        return resolve_arch(name_or_path, offline=True)
    except ValueError as exc:
        raise ToyError(f"{exc}; download its config.json once, or add it to grpo.commands.plan.KNOWN_ARCHS") from None


def _moe_kwargs(arch: Arch) -> dict[str, Any]:
    """Expert options in the names each family's config uses."""
    t, e, k, width = arch.model_type, TOY_EXPERTS, TOY_TOP_K, TOY_WIDTH
    if t in ("qwen2_moe", "qwen3_moe"):
        out = {"num_experts": e, "num_experts_per_tok": k, "moe_intermediate_size": width}
        if t == "qwen2_moe":
            out["shared_expert_intermediate_size"] = width
        return out
    if t == "olmoe":  # experts are intermediate_size wide
        return {"num_experts": e, "num_experts_per_tok": k, "intermediate_size": width}
    if t == "mixtral":
        return {"num_local_experts": e, "num_experts_per_tok": k, "intermediate_size": width}
    if t in ("deepseek_v2", "deepseek_v3"):
        # V3 routes group-limited (sigmoid scores, correction bias, best groups first); V2's toy
        # keeps its greedy top-k
        v3 = t == "deepseek_v3"
        return {"n_routed_experts": TOY_V3_EXPERTS if v3 else e, "num_experts_per_tok": k,
                "moe_intermediate_size": width, "n_shared_experts": min(arch.shared_experts, 1) or None,
                "first_k_dense_replace": min(arch.first_dense_layers, TOY_LAYERS - 1),
                "n_group": TOY_V3_GROUPS if v3 else 1, "topk_group": TOY_V3_TOPK_GROUPS if v3 else 1,
                # what DeepSeek-V3's config.json says and vLLM reads (transformers' V3 router always
                # scores so): sigmoid scores, the correction bias ("noaux_tc")
                **({"topk_method": "noaux_tc", "scoring_func": "sigmoid"} if v3 else {})}
    raise ToyError(f"toy scale does not know the expert options of model_type {t!r}")


def toy_config_kwargs(arch: Arch, vocab_size: int, pad_id: int, eos_id: int) -> dict[str, Any]:
    """transformers config arguments of the toy model of `arch`'s family."""
    if not arch.model_type:
        raise ToyError(f"{arch.name}: no model_type known for its architecture")
    heads = 2
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": TOY_WIDTH, "num_hidden_layers": TOY_LAYERS,
        "num_attention_heads": heads, "num_key_value_heads": 1 if arch.num_kv_heads < arch.num_heads else heads,
        "head_dim": TOY_HEAD_DIM, "intermediate_size": 2 * TOY_WIDTH, "max_position_embeddings": TOY_POSITIONS,
        "tie_word_embeddings": arch.tie_embeddings, "pad_token_id": pad_id, "eos_token_id": eos_id,
        "bos_token_id": eos_id,
    }
    if arch.is_mla:
        # The latent keeps the real 512 + 64 width: vLLM's CPU MLA kernels take no other (a latent of
        # 96 or 320 fails at the first generate); heads are small. A query LoRA only where the real
        # model has one, and YaRN RoPE as DeepSeek-V2-Lite and V3 use.
        kwargs.update(kv_lora_rank=512, q_lora_rank=TOY_WIDTH // 2 if arch.q_lora_rank else None,
                      qk_nope_head_dim=TOY_HEAD_DIM, qk_rope_head_dim=64, v_head_dim=TOY_HEAD_DIM,
                      num_key_value_heads=heads,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": TOY_POSITIONS // 4, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
        kwargs.pop("head_dim")
    if arch.is_moe:
        kwargs.update(_moe_kwargs(arch))
    return kwargs


# --- the tokenizer -----------------------------------------------------------------------------


def build_byte_tokenizer(model_max_length: int = TOY_POSITIONS):
    """A byte-level BPE tokenizer without merges: one token per byte, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   model_max_length=model_max_length)


# --- cached artefacts --------------------------------------------------------------------------


def toy_root() -> Path:
    from grpo.model.cache import cache_root

    return cache_root() / "toy"


def _digest(payload: Any) -> str:
    import torch
    import transformers

    text = json.dumps({"payload": payload, "version": TOY_VERSION, "torch": torch.__version__,
                       "transformers": transformers.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """`toy_root()/name`, built once by `build(tmp)` (atomically: `grpo.model.cache.build_once`)."""
    from grpo.model.cache import build_once

    def complete(tmp: Path) -> None:
        build(tmp)
        (tmp / ".complete").write_text("")

    return build_once(toy_root() / name, complete, marker=".complete")


def ensure_toy_model(name_or_path: str, seed: int = 0) -> Path:
    """The directory of the toy model of `name_or_path`'s family (random init, tokenizer saved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo.model.tiny import BUILTIN_BASES, BUILTIN_PREFIX, build_char_tokenizer, tiny_moe_config

    base = name_or_path[len(BUILTIN_PREFIX):] if name_or_path.startswith(BUILTIN_PREFIX) else None
    if base in BUILTIN_BASES:  # a tiny base's own shape and tokenizer, not pretrained
        tokenizer = build_char_tokenizer()
        config = tiny_moe_config(BUILTIN_BASES[base], len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        label = f"builtin-{base}"
    else:
        arch = source_arch(name_or_path)
        tokenizer = build_byte_tokenizer()
        kwargs = toy_config_kwargs(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        config = AutoConfig.for_model(arch.model_type, **kwargs)
        label = arch.model_type

    def build(out: Path) -> None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "grpo_zero_toy.json").write_text(json.dumps({"family_of": name_or_path, "seed": seed}))

    return _cached_dir(f"model-{label}-{_digest([config.to_dict(), seed])}", build)


# --- local data with the recipe's columns ------------------------------------------------------


def _problem_rows(countdown: bool, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if countdown:
        task = CountdownTask(min_numbers=3, max_numbers=3, max_number=20, max_target=50, num_problems=n)
        return task.all_rows(seed)
    task = ArithmeticTask(max_first=99, max_second=9)
    rows = []
    for _ in range(n):
        q, a = task.sample_problem(rng)
        rows.append({"question": f"What is {q}?", "answer": a})
    return rows


def _as_record(row: dict, prompt_field: str | None, answer_field: str | None, extra: dict[str, str]) -> dict:
    """A row written in the source's own column names (what `grpo.data.sources.read_rows` maps back)."""
    record: dict[str, Any] = {}
    if prompt_field:
        record[prompt_field] = row["question"]
    if answer_field:
        record[answer_field] = row["answer"]
    for key, column in extra.items():
        record[column] = row.get(key, row["answer"])
    return record


def toy_data_file(src, countdown: bool, n: int, seed: int) -> Path:
    """A JSON-lines file of `n` synthetic problems in `src`'s columns (a SourceFields)."""
    fields = [src.prompt_field, src.answer_field, dict(src.extra_fields)]

    def build(out: Path) -> None:
        rows = _problem_rows(countdown, n, seed)
        with open(out / "rows.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(_as_record(row, *fields)) + "\n")

    return _cached_dir(f"data-{_digest([fields, countdown, n, seed])}", build) / "rows.jsonl"


# --- the recipe at toy scale -------------------------------------------------------------------


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def toy_recipe(cfg: RunConfig, overrides: Sequence[str] = (), source: str = "recipe",
               cuda: bool | None = None) -> tuple[RunConfig, list[str]]:
    """(the recipe at toy scale, one line per change). `overrides` (key=value, as on the command
    line) are applied last, so they win over the cuts."""
    from grpo.data.prompts import template_fields

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    def overridden(tree: dict) -> dict:
        return apply_overrides(tree, tuple(overrides))  # the caller's own overrides

    cfg = parse_recipe_dict(overridden(cfg.model_dump(mode="json")), source)  # decide on what will run
    raw = cfg.model_dump(mode="json")
    notes: list[str] = []

    def change(dotted: str, value: Any, why: str = "") -> None:
        old = _get(raw, dotted)
        if old != value:
            _set_dotted(raw, dotted, value, source)
            notes.append(f"{dotted}: {old!r} -> {value!r}" + (f" ({why})" if why else ""))

    for dotted, rule in TOY_SCALE.items():
        change(dotted, rule(_get(raw, dotted)) if callable(rule) else rule)

    model = ensure_toy_model(cfg.model.name_or_path, seed=cfg.trainer.seed)
    change("model.name_or_path", str(model), f"random-init {cfg.model.name_or_path} family")
    if not cuda:
        change("model.dtype", "float32", "CPU")
        if cfg.model.attn_implementation not in (None, "sdpa", "eager"):
            change("model.attn_implementation", "sdpa", "CPU")
        if cfg.model.lora is not None and cfg.model.lora.load_in_4bit:
            change("model.lora.load_in_4bit", False, "CPU: a 4-bit base (bitsandbytes) needs CUDA")
        if cfg.rollout.engine == "vllm":
            change("rollout.vllm.kv_cache_memory_mb", cfg.rollout.vllm.kv_cache_memory_mb or 64, "CPU")
            change("rollout.vllm.enforce_eager", True, "CPU")
            if cfg.moe.routing_replay == "R3":
                change("moe.routing_replay", "R2", "vLLM's CPU build cannot return routed experts; the "
                       "transformers engine runs R3")

    countdown = bool({"numbers", "target"} & template_fields(cfg.data.template))
    if cfg.data.source not in SYNTHETIC_TASKS:
        path = toy_data_file(cfg.data, countdown, TOY_TRAIN_ROWS, cfg.data.seed)
        change("data.source", str(path), "local rows in the recipe's columns")
        change("data.config", None)
        change("data.revision", None)
    for i, spec in enumerate(cfg.eval.datasets):
        if spec.source not in SYNTHETIC_TASKS:
            path = toy_data_file(spec, countdown, TOY_EVAL_ROWS, cfg.data.seed + 1 + i)
            change(f"eval.datasets.{i}.source", str(path), f"local rows for {spec.name}")
            change(f"eval.datasets.{i}.config", None)
            change(f"eval.datasets.{i}.revision", None)
            change(f"eval.datasets.{i}.num_prompts", TOY_EVAL_ROWS)

    return parse_recipe_dict(overridden(raw), source), notes  # the caller's overrides win over the cuts
