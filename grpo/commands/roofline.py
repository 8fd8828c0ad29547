"""The clock of `grpo plan`: every hardware figure and efficiency it uses, in one table, and the
roofline that turns a layout and a workload into seconds.

A synchronous colocated GRPO loop spends each generation batch in four phases, one after another:
- prefill of the prompts (once per group: prefix caching), from FLOPs at `prefill_mfu`;
- decode, a roofline per decode step: the bytes read from HBM (the weights a step touches, every
  routed expert a large batch reaches, and the KV cache of the sequences in flight) against the FLOPs
  at `decode_mfu`, whichever is longer, plus the expert-parallel all-to-all and tensor-parallel
  all-reduce over NVLink or InfiniBand (bandwidth and per-call latency) and a fixed engine overhead.
  The batch lasts as long as its longest sequence (`tail`) in every wave the KV cache allows;
- the weight push from the trainer's shards to the engines (a bf16 all-gather);
- training of each optimizer step: hardware FLOPs (forward, backward, the recomputed forward of
  activation checkpointing, extra forwards for a reference model) at `train_mfu`, or the FSDP2
  all-gathers and reduce-scatters of each micro-batch round if those take longer.

Constants are global: the bench (bench/plan_vs_published.py) checks them against published runs and
never adjusts them per run. tail, hbm, train_mfu, step_overhead_s and a2a_latency_internode_s were
chosen once, within the ranges their sources give, from a small grid scored on all the bench's runs
together (worst |predicted/published - 1|), not per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOST_SOURCE_DGX_H100 = ("DGX H100/H800 and H200 datasheets: 2 TB (2,048 GB) of system memory per node of 8 GPUs (256 GB = 238 GiB each); "
                        "PCIe Gen5 x16: 64 GB/s per direction, ~50 GB/s achieved by pinned copies")
HOST_SOURCE_DGX_A100 = ("DGX A100 datasheet: 1 TB (1,024 GB) of system memory per node of 8 GPUs (2 TB optional; 128 GB = 119 GiB each); "
                        "PCIe Gen4 x16: 32 GB/s per direction, ~25 GB/s achieved by pinned copies")


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the device reports as total
    bf16_tflops: float  # dense peak, no sparsity
    hbm_tb_s: float
    nvlink_gb_s: float  # per GPU, both directions together, as vendors quote it
    internode_gb_s: float  # per GPU, one direction (one NIC per GPU)
    source: str
    host_gib: float = 238.0  # host (CPU) memory per GPU, GiB: the node's RAM over its 8 GPUs (2,048 GB / 8)
    pcie_gb_s: float = 50.0  # achieved host <-> GPU copy bandwidth per GPU, one direction (pinned memory)
    host_source: str = HOST_SOURCE_DGX_H100


# THE table: every hardware figure and efficiency `grpo plan` uses, with where it comes from.
GPUS: dict[str, GPU] = {
    "h800": GPU("H800 SXM 80GB", 79.6, 989.0, 3.35, 400.0, 50.0,
                "H100 SXM datasheet compute and HBM (the H800 differs only in NVLink: 400 GB/s); 400 Gb/s "
                "InfiniBand per GPU as in DeepSeek-V3 (arXiv 2412.19437, section 3.1: IB 50 GB/s, NVLink 160 GB/s achieved)"),
    "h100": GPU("H100 SXM 80GB", 79.6, 989.0, 3.35, 900.0, 50.0,
                "NVIDIA H100 datasheet (SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s, NVLink 900 GB/s); ConnectX-7 400 Gb/s per GPU (DGX H100)"),
    "h200": GPU("H200 SXM 141GB", 139.8, 989.0, 4.8, 900.0, 50.0,
                "NVIDIA H200 datasheet (989 TFLOP/s bf16 dense, 4.8 TB/s, NVLink 900 GB/s); 400 Gb/s per GPU (DGX H200)"),
    "a100": GPU("A100 SXM 80GB", 79.2, 312.0, 2.04, 600.0, 25.0,
                "NVIDIA A100 datasheet (312 TFLOP/s bf16 dense, 2,039 GB/s, NVLink 600 GB/s); HDR 200 Gb/s per GPU (DGX A100)",
                119.0, 25.0, HOST_SOURCE_DGX_A100),
    "a100-40": GPU("A100 SXM 40GB", 39.4, 312.0, 1.56, 600.0, 25.0,
                   "NVIDIA A100 datasheet (40GB SXM: 1,555 GB/s); HDR 200 Gb/s per GPU (DGX A100)",
                119.0, 25.0, HOST_SOURCE_DGX_A100),
    "a800": GPU("A800 SXM 80GB", 79.2, 312.0, 2.04, 400.0, 25.0,
                "A100 SXM 80GB figures with NVLink cut to 400 GB/s (NVIDIA A800 product brief)",
                119.0, 25.0, HOST_SOURCE_DGX_A100),
}


@dataclass(frozen=True)
class Efficiency:
    """Achieved shares of the peaks above, and fixed costs; one set for every run."""

    hbm: float = 0.70  # share of HBM bandwidth decode kernels reach (weights + paged KV reads)
    link: float = 0.80  # share of NVLink / InfiniBand bandwidth collectives reach (V3: 160 of 200 GB/s NVLink)
    decode_mfu: float = 0.30  # share of bf16 peak for decode matmuls where a step is compute-bound
    prefill_mfu: float = 0.40  # share of bf16 peak for prefill (long, batched matmuls)
    train_mfu: float = 0.45  # share of bf16 peak for training hardware FLOPs, dense models
    train_mfu_moe: float = 0.25  # the same for Mixture-of-Experts (grouped GEMMs, all-to-all)
    step_overhead_s: float = 0.015  # per decode step: scheduler, sampling, kernel launches of the engine
    a2a_latency_s: float = 40e-6  # per all-to-all (dispatch or combine) and MoE layer, inside a node
    a2a_latency_internode_s: float = 100e-6  # the same across nodes (DeepEP low-latency kernels: 100-200 us)
    allreduce_latency_s: float = 15e-6  # per tensor-parallel all-reduce inside a node (NCCL, small messages)
    tail: float = 2.5  # longest sequence of a generation batch / mean length (capped at max_new_tokens)
    length_cv: float = 0.8  # coefficient of variation of completion lengths (E[L^2] = mean^2 (1 + cv^2))


EFFICIENCY = Efficiency()
SOURCES = {
    "hbm": "decode attention and GEMV kernels reach 60-80% of HBM bandwidth (FlashInfer / FlashMLA reports)",
    "link": "DeepSeek-V3 report section 3.1: 160 GB/s achieved of the H800's 200 GB/s NVLink per direction",
    "decode_mfu, prefill_mfu": "typical serving utilisation of bf16 peak for batched decode / prefill",
    "train_mfu, train_mfu_moe": "hardware-FLOP utilisation of FSDP training (dense 30-40%; MoE lower)",
    "step_overhead_s": "vLLM per-step CPU time (scheduling, sampling, detokenising) of 5-20 ms at RL batch sizes",
    "a2a_latency_s": "NCCL / DeepEP all-to-all latency: tens of us in a node, 100-200 us across nodes (DeepEP README)",
    "tail": "a generation batch of thousands of samples runs until its longest sample: several times the mean",
    "length_cv": "spread of completion lengths in RL rollouts (roughly exponential to gamma-shaped)",
}


@dataclass(frozen=True)
class Layout:
    """One rollout engine spans tp x dp GPUs: attention split over tp, replicated over dp (data-parallel
    attention: each dp rank holds its own sequences), experts split over all tp x dp (expert parallel)."""

    tp: int = 1
    dp: int = 1

    @property
    def size(self) -> int:
        return self.tp * self.dp


def ring_gb_s(gpu: GPU, group: int, gpus_per_node: int, eff: Efficiency = EFFICIENCY) -> float:
    """Achieved per-GPU bandwidth of a ring collective (all-gather, reduce-scatter, all-reduce) over
    `group` GPUs: NVLink inside a node; across nodes, NCCL's rings (one per NIC) share the node's
    InfiniBand, so the slower of NVLink and the node's NICs together."""
    nvlink = gpu.nvlink_gb_s / 2
    if group > gpus_per_node:
        nvlink = min(nvlink, gpus_per_node * gpu.internode_gb_s)
    return nvlink * eff.link


def a2a_gb_s(gpu: GPU, group: int, gpus_per_node: int, eff: Efficiency = EFFICIENCY) -> float:
    """Achieved per-GPU bandwidth of an all-to-all over `group` GPUs: NVLink in a node, the GPU's own
    NIC across nodes."""
    raw = gpu.nvlink_gb_s / 2 if group <= gpus_per_node else gpu.internode_gb_s
    return raw * eff.link


def experts_touched(tokens: float, num_experts: int, top_k: int) -> float:
    """Expected share of routed experts a decode step over `tokens` tokens reaches (uniform routing)."""
    if num_experts == 0 or tokens <= 0:
        return 0.0
    return 1 - (1 - top_k / num_experts) ** tokens


def weight_bytes_per_gpu(arch, layout: Layout, tokens_per_step: float) -> float:
    """bf16 weight bytes one engine GPU reads in a decode step: its share of the dense weights
    (attention, dense FFNs, shared experts, output head; split over tp) and of the routed experts
    the step's tokens reach (split over the whole engine)."""
    total, _ = arch.params()
    routed = arch.routed_params()
    touched = experts_touched(tokens_per_step, arch.num_experts, arch.top_k)
    return 2 * (total - routed - arch.vocab_size * arch.hidden_size * (0 if arch.tie_embeddings else 1)) / layout.tp \
        + 2 * routed * touched / layout.size


def kv_bytes_per_token_per_gpu(arch, layout: Layout) -> float:
    """KV cache bytes per token on one GPU of an attention group: MLA's latent is replicated over tp
    ranks; grouped-query heads split over tp (replicated past the number of KV heads)."""
    per_token = arch.kv_bytes_per_token()
    return per_token if arch.is_mla else per_token / min(layout.tp, arch.num_kv_heads)


@dataclass
class GenerationTime:
    """Seconds of one generation batch, by part, and the counts they came from."""

    decode_steps: float
    waves: int
    weights_s: float
    kv_s: float
    compute_s: float
    a2a_s: float
    allreduce_s: float
    overhead_s: float
    prefill_s: float

    @property
    def total(self) -> float:
        memory = self.weights_s + self.kv_s
        return max(memory, self.compute_s) + self.a2a_s + self.allreduce_s + self.overhead_s + self.prefill_s


def generation_time(arch, gpu: GPU, gpus_per_node: int, world: int, layout: Layout, sequences: int, prompts: int,
                    prompt_tokens: int, mean_tokens: float, max_new_tokens: int, concurrency: float,
                    eff: Efficiency = EFFICIENCY) -> GenerationTime:
    """One generation batch of `sequences` completions of `prompts` prompts on `world` GPUs split into
    engines of `layout`; `concurrency`: sequences one attention group (tp GPUs) decodes at once."""
    replicas = max(1, world // layout.size)
    per_rank = math.ceil(math.ceil(sequences / replicas) / layout.dp)  # sequences of one attention group
    conc = max(1.0, min(per_rank, concurrency))
    waves = math.ceil(per_rank / conc)
    tail = min(max_new_tokens, eff.tail * mean_tokens)
    steps = per_rank * mean_tokens / conc + max(0.0, tail - mean_tokens)
    hbm = gpu.hbm_tb_s * 1e12 * eff.hbm
    weights = steps * weight_bytes_per_gpu(arch, layout, conc * layout.dp) / hbm
    mean_ctx = prompt_tokens + mean_tokens * (1 + eff.length_cv ** 2) / 2  # context a generated token attends to
    tokens_rank = per_rank * mean_tokens
    kv = tokens_rank * mean_ctx * kv_bytes_per_token_per_gpu(arch, layout) / hbm
    _, active = arch.params()
    attn = 2 * arch.num_layers * arch.attention_width()
    flops_gpu = tokens_rank * layout.dp * (2 * active + attn * mean_ctx) / layout.size
    compute = flops_gpu / (gpu.bf16_tflops * 1e12 * eff.decode_mfu)
    a2a = 0.0
    if arch.is_moe and layout.size > 1:
        moe_layers = arch.num_layers - arch.first_dense_layers
        per_token = 2 * arch.top_k * arch.hidden_size * 2 * moe_layers * (layout.size - 1) / layout.size
        bw = a2a_gb_s(gpu, layout.size, gpus_per_node, eff) * 1e9
        latency = eff.a2a_latency_s if layout.size <= gpus_per_node else eff.a2a_latency_internode_s
        a2a = tokens_rank * layout.dp / layout.size * per_token / bw + steps * 2 * moe_layers * latency
    allreduce = 0.0
    if layout.tp > 1:
        per_token = 2 * arch.num_layers * arch.hidden_size * 2 * 2 * (layout.tp - 1) / layout.tp
        bw = ring_gb_s(gpu, layout.tp, gpus_per_node, eff) * 1e9
        allreduce = tokens_rank * per_token / bw + steps * 2 * arch.num_layers * eff.allreduce_latency_s
    prefill_flops = 2 * active * prompts * prompt_tokens + prompts * prompt_tokens * attn * prompt_tokens / 2
    prefill = prefill_flops / (world * gpu.bf16_tflops * 1e12 * eff.prefill_mfu)
    return GenerationTime(steps, waves, weights, kv, compute, a2a, allreduce, steps * eff.step_overhead_s, prefill)


@dataclass
class TrainTime:
    compute_s: float
    collectives_s: float
    rounds: int
    offload_s: float = 0.0  # saved activations to host memory and back (synchronous copies)

    @property
    def total(self) -> float:  # FSDP2 prefetches the next layer's gather during this one's compute
        return max(self.compute_s, self.collectives_s) + self.offload_s


def train_time(arch, gpu: GPU, gpus_per_node: int, world: int, shard_group: int, sequences: int, prompt_tokens: int,
               mean_tokens: float, micro_batch_size: int, extra_forwards: int,
               eff: Efficiency = EFFICIENCY, checkpointing: bool = True,
               offload_bytes_per_token: float = 0.0, trained_params: int | None = None,
               max_tokens_per_micro_batch: int | None = None) -> TrainTime:
    """One optimizer step over `sequences` completions: forward and backward (6 N per token), plus
    the recomputed forward of activation checkpointing (8 N), 2 N per extra forward (reference
    model, old log-probs), causal attention likewise; FSDP2 gathers the bf16 weights for the forward
    and again for the backward and reduce-scatters bf16 gradients in each micro-batch round.
    `offload_bytes_per_token`: saved activations copied to host memory in the forward and back in
    the backward over PCIe (torch's save_on_cpu copies synchronously: not hidden behind compute).
    `trained_params` (LoRA: the adapters' count): the backward computes no gradient of the frozen
    base's weights (2 N per token less; the adapters' own FLOPs are left out, about 2 r / width of
    N) and reduce-scatters only the adapters' gradients. FLOPs count real tokens (packed
    micro-batches; padded ones cost more where lengths spread); `max_tokens_per_micro_batch` (packed
    micro-batches' budget) adds the rounds the token budget cuts beyond `micro_batch_size`."""
    total, active = arch.params()
    seq = prompt_tokens + mean_tokens
    tokens = sequences * seq
    attn = 2 * arch.num_layers * arch.attention_width() * seq / 2
    passes = (8 if checkpointing else 6) - (2 if trained_params is not None else 0)
    flops = (passes + 2 * extra_forwards) * active * tokens + (passes // 2 + extra_forwards) * attn * tokens
    mfu = eff.train_mfu_moe if arch.is_moe else eff.train_mfu
    compute = flops / (world * gpu.bf16_tflops * 1e12 * mfu)
    rounds = max(1, math.ceil(sequences / world / micro_batch_size))
    if max_tokens_per_micro_batch is not None:
        rounds = max(rounds, math.ceil(sequences / world * seq / max_tokens_per_micro_batch))
    collectives = 0.0
    if shard_group > 1:
        bw = ring_gb_s(gpu, shard_group, gpus_per_node, eff) * 1e9
        grads = total if trained_params is None else trained_params
        collectives = rounds * (2 * 2 * total + 2 * grads) * (shard_group - 1) / shard_group / bw
    offload = 2 * offload_bytes_per_token * tokens / world / (gpu.pcie_gb_s * 1e9)
    return TrainTime(compute, collectives, rounds, offload)


def weight_push_seconds(arch, gpu: GPU, gpus_per_node: int, world: int, eff: Efficiency = EFFICIENCY,
                        params: int | None = None) -> float:
    """Trainer shards to the engines once per generation batch: every GPU gathers the bf16 weights
    (layer by layer) and keeps its engine's share. `params`: what is pushed when it is not the
    whole model (a LoRA adapter)."""
    total = arch.params()[0] if params is None else params
    if world == 1:
        return 2 * total / (gpu.hbm_tb_s * 1e12 * eff.hbm)
    return 2 * total * (world - 1) / world / (ring_gb_s(gpu, world, gpus_per_node, eff) * 1e9)
