"""Will a recipe fit in this machine's memory when it trains on the CPU? (`grpo plan RECIPE --gpu cpu`,
and the check `grpo train` makes before any weights load.)

    grpo plan recipes/tiny-cpu.yaml --gpu cpu          # also the default where there is no CUDA device
    grpo plan recipes/tiny-cpu.yaml model.name_or_path=./my-0.5b rollout.engine=vllm

The estimate reads only the model's config.json (parameter counts from `grpo.commands.plan.Arch`)
and the recipe. Peak memory of the job on this machine =

    per process: resident + max(training transient, rollout transient) + fixed overhead
      resident: policy weights, AdamW's two moments, the reference copy (algorithm.beta > 0),
                the vLLM engine's weights and KV cache (rollout.engine vllm: no sleep mode on CPU)
      training: gradients, the micro-batch's kept activations, its logits chunk (float32)
      rollout:  the transformers engine's KV cache for the step's sequences
    times the processes on this machine (each holds whole copies under DDP; an overestimate
    under FSDP2), plus the reward workers and, for asynchronous RL, the generation process.

Every constant is in the block below with its reason; the calibration runs are in README ("Will it
fit on this machine?"). A job whose estimate exceeds MemTotal stops at start-up with one line
(`NotEnoughMemory`); one that exceeds MemAvailable gets one warning line. Set
GRPO_ZERO_SKIP_MEMORY_CHECK=1 to skip the check (the estimate may be wrong for an unusual model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from grpo.commands.plan import Arch, resolve_arch
from grpo.errors import UserError

GIB = 1024**3
SKIP_ENV = "GRPO_ZERO_SKIP_MEMORY_CHECK"

# --- constants, each with its reason ------------------------------------------------------------
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "half": 2, "float": 4}
# torch's AdamW keeps exp_avg and exp_avg_sq in the parameter's own dtype (zeros_like(param)):
# 2 x 4 bytes per parameter in float32, 2 x 2 in bfloat16. There are no float32 master weights.
ADAM_STATES = 2
# Activations autograd keeps per token and decoder layer, in elements of the model dtype (no
# activation checkpointing on CPU): the norms' inputs and outputs, q/k/v/o and the attention output
# (about HIDDEN_ACTS x hidden), and the SwiGLU MLP's gate, up, act(gate) and product (FFN_ACTS x
# the FFN width). Counted from a Qwen2/Llama layer's saved tensors, not fitted: in the README's runs the
# update's peak was the gradients, so these runs do not pin it down.
HIDDEN_ACTS = 12
FFN_ACTS = 4
# Float32 [sequences, chunk, vocab] tensors alive at once in the backward of one logits chunk
# (grpo/algo/logprobs.py: the recomputed logits and log-softmax, and their two gradients).
LOGITS_COPIES = 4
# A prompt's length in tokens where the recipe sets no data.max_prompt_tokens (as `grpo plan` assumes).
PROMPT_TOKENS = 256
# Python + torch + transformers + accelerate in the training process: peak RSS 0.59 GiB for a whole
# run of the 0.8M-parameter builtin:tiny-arith-moe (README).
PROCESS_GIB = 0.6
# One reward worker process (rewards/): the 2 workers of the README's runs added 0.35 GiB to the tree.
REWARD_WORKER_GIB = 0.2
# What vLLM's CPU build adds in process besides its weights and KV cache (its imports, compiled
# graph and buffers). With VLLM_WEIGHT_COPIES: 4.9 GiB predicted for the 0.5B shape in float32 with a
# 256 MiB KV cache, 4.5 GiB measured (README: vllm run minus hf run).
VLLM_PROCESS_GIB = 1.0
# vLLM's CPU build holds its weights and, after start-up, its repacked copy of every linear layer
# (FACTS.md: it repacks linear weights): counted as this many copies of the weights.
VLLM_WEIGHT_COPIES = 2.0
# vLLM's KV cache on CPU when rollout.vllm.kv_cache_memory_mb is unset (rollout/vllm/engine.py).
VLLM_CPU_KV_MIB = 256


class NotEnoughMemory(UserError):
    """The run's memory estimate exceeds this machine's RAM: one line with the estimate, the RAM
    and what to change."""


@dataclass(frozen=True)
class MachineMemory:
    total_gib: float  # MemTotal, or a cgroup limit below it
    available_gib: float  # MemAvailable
    source: str


def machine_memory() -> MachineMemory | None:
    """This machine's RAM: /proc/meminfo (and a cgroup v2 limit below MemTotal), else psutil where it
    is installed; None where neither says (the check is then skipped)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = {}
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024
        if "MemTotal" in fields:
            total = fields["MemTotal"]
            available = fields.get("MemAvailable", total)
            source = "/proc/meminfo"
            limit = Path("/sys/fs/cgroup/memory.max")
            text = limit.read_text().strip() if limit.is_file() else "max"
            if text.isdigit() and int(text) < total:
                total, available, source = int(text), min(available, int(text)), "cgroup memory.max"
            return MachineMemory(total / GIB, available / GIB, source)
    try:
        import psutil
    except ImportError:
        return None
    vm = psutil.virtual_memory()
    return MachineMemory(vm.total / GIB, vm.available / GIB, "psutil")


@dataclass
class CPUEstimate:
    """The peak memory of a recipe's job on this machine, by part (GiB)."""

    arch: Arch
    params: int
    dtype: str
    processes: int
    resident: dict[str, float] = field(default_factory=dict)  # per training process, all the time
    training: dict[str, float] = field(default_factory=dict)  # per training process, during the update
    rollout: dict[str, float] = field(default_factory=dict)  # per training process, while generating
    other: dict[str, float] = field(default_factory=dict)  # other processes of the job
    notes: list[str] = field(default_factory=list)
    accumulates: bool = False  # several micro-batches a step: earlier gradients live through later forwards
    head_grad_gib: float = 0.0  # the output head's gradient, the first one backward allocates

    @property
    def update_gib(self) -> float:
        """One micro-batch's update: with one micro-batch, backward frees activations as it fills the
        gradients, so the peak is the larger of all gradients and the activations plus logits plus the
        head's gradient (its start); with several, earlier gradients are there all along."""
        grads = sum(v for k, v in self.training.items() if k.startswith("gradients"))
        rest = sum(self.training.values()) - grads
        return grads + rest if self.accumulates else max(grads, rest + self.head_grad_gib)

    @property
    def per_process_gib(self) -> float:
        return sum(self.resident.values()) + max(self.update_gib, sum(self.rollout.values()))

    @property
    def total_gib(self) -> float:
        return self.processes * self.per_process_gib + sum(self.other.values())


def estimate_cpu_memory(cfg, arch: Arch, processes: int = 1) -> CPUEstimate:
    """The estimate for recipe `cfg` with model `arch`, `processes` training processes on this machine."""
    total, _ = arch.params()
    dtype = cfg.model.dtype
    b = DTYPE_BYTES[dtype]
    est = CPUEstimate(arch, total, dtype, processes)
    ro, tr, algo = cfg.rollout, cfg.trainer, cfg.algorithm
    asynchronous = tr.max_staleness > 0
    vllm_here = ro.engine == "vllm" and not asynchronous  # asynchronous: the engine lives in the generation process

    lora = cfg.model.lora
    trained = arch.lora_params(lora.rank, lora.experts) if lora is not None else total  # LoRA: the adapters only
    est.resident[f"policy weights ({dtype})"] = total * b / GIB
    if lora is not None:
        est.resident[f"LoRA adapters (rank {lora.rank}, {dtype})"] = trained * b / GIB
    est.resident[f"AdamW moments ({ADAM_STATES} x {dtype})"] = ADAM_STATES * trained * b / GIB
    if algo.beta > 0 and lora is None:  # LoRA's reference is the policy with its adapters off
        est.resident[f"reference copy (algorithm.beta {algo.beta:g})"] = total * b / GIB
    est.resident["process (python, torch, transformers)"] = PROCESS_GIB
    if vllm_here:
        for k, v in _vllm_parts(cfg, total).items():
            est.resident[k] = v

    # the update: one micro-batch of this process's sequences
    sequences = max(1, tr.prompts_per_step * ro.group_size // processes)
    micro = min(tr.micro_batch_size, sequences)
    prompt = cfg.data.max_prompt_tokens or PROMPT_TOKENS
    seq = prompt + ro.max_new_tokens
    # each distinct prompt runs once, logits at completions only; with several processes (DDP/FSDP
    # wrappers) only in packed micro-batches, whose shared-prompt row is one ordinary forward
    if tr.shared_prompt_forward and (processes == 1 or tr.max_tokens_per_micro_batch is not None):
        tokens = -(-micro // ro.group_size) * prompt + micro * ro.max_new_tokens
        scored, shape = ro.max_new_tokens, f"{micro} seq, prompts shared: {tokens} tokens"
    else:  # one forward of every row
        tokens, scored, shape = micro * seq, seq, f"{micro} seq x {seq} tokens"
    acts = tokens * arch.num_layers * (HIDDEN_ACTS * arch.hidden_size + FFN_ACTS * arch.ffn_active_width()) * b
    chunk = min(algo.logprob_chunk, scored)
    est.training[f"gradients ({dtype})"] = trained * b / GIB
    est.accumulates = micro < sequences
    est.head_grad_gib = arch.vocab_size * arch.hidden_size * b / GIB if lora is None else 0.0  # a frozen head
    est.training[f"activations ({shape})"] = acts / GIB
    est.training[f"logits (float32, {micro} seq x {chunk}-token chunk x {arch.vocab_size} vocab, x{LOGITS_COPIES})"] = (
        LOGITS_COPIES * micro * chunk * arch.vocab_size * 4 / GIB)
    if not vllm_here:  # the transformers engine decodes the process's sequences with a KV cache
        est.rollout[f"KV cache ({sequences} seq x {seq} tokens, transformers engine)"] = (
            sequences * seq * arch.kv_bytes_per_token(b) / GIB)

    if tr.max_staleness > 0:  # the generation process: its own policy copy and engine
        est.other["generation process: policy copy"] = total * b / GIB
        est.other["generation process: python, torch"] = PROCESS_GIB
        if ro.engine == "vllm":
            for k, v in _vllm_parts(cfg, total).items():
                est.other[f"generation process: {k}"] = v
    if cfg.rewards.workers:
        est.other[f"reward workers ({cfg.rewards.workers})"] = cfg.rewards.workers * REWARD_WORKER_GIB
    if processes > 1:
        est.notes.append(f"{processes} processes on this machine, each counted with whole copies (DDP); FSDP2 "
                         "shards the weights and optimizer, so it needs less")
    if not cfg.data.max_prompt_tokens:
        est.notes.append(f"prompts assumed {PROMPT_TOKENS} tokens long (data.max_prompt_tokens is unset)")
    return est


def _vllm_parts(cfg, total: int) -> dict[str, float]:
    v = cfg.rollout.vllm
    dtype = cfg.model.dtype if v.dtype == "auto" else v.dtype
    kv_mib = v.kv_cache_memory_mb or VLLM_CPU_KV_MIB
    return {f"vLLM weights ({dtype}, x{VLLM_WEIGHT_COPIES:g} with its repacked copy)":
            VLLM_WEIGHT_COPIES * total * DTYPE_BYTES.get(dtype, 4) / GIB,
            f"vLLM KV cache ({kv_mib} MiB)": kv_mib / 1024,
            "vLLM process additions": VLLM_PROCESS_GIB}


def local_processes(accelerate_config: Path | None) -> int:
    """Training processes an accelerate config starts on each machine (1 without one)."""
    if accelerate_config is None:
        return 1
    import yaml

    conf = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
    return max(1, int(conf.get("num_processes", 1) or 1) // max(1, int(conf.get("num_machines", 1) or 1)))


def cheap_arch(name_or_path: str) -> Arch | None:
    """The model's architecture without loading weights or reaching the network: the embedded table,
    a local config.json or the Hub cache. None for the built-in tiny bases (a few MB) and for anything
    whose config cannot be read here (the loader then says what is wrong)."""
    if name_or_path.startswith("builtin:"):
        return None
    try:
        return resolve_arch(name_or_path, offline=True)
    except (ValueError, KeyError, TypeError, OSError):
        return None


def advice(cfg, est: CPUEstimate) -> str:
    """What to change, largest saving first."""
    tips = []
    if est.dtype == "float32":
        tips.append("model.dtype=bfloat16 (halves weights, gradients and AdamW moments)")
    vllm = {k: v for k, v in {**est.resident, **est.other}.items() if "vLLM" in k}
    if vllm:
        tips.append(f"rollout.engine=hf (drops vLLM's {sum(vllm.values()):.1f} GiB)")
    if cfg.algorithm.beta > 0:
        tips.append("algorithm.beta=0 (no reference copy)")
    acts = sum(v for k, v in est.training.items() if not k.startswith("gradients"))
    if acts > 0.25 * est.per_process_gib and cfg.trainer.micro_batch_size > 1:
        tips.append("a lower trainer.micro_batch_size")
    if est.processes > 1:
        tips.append("fewer processes")
    tips.append("a smaller model")
    return ", ".join(tips)


def check_cpu_memory(cfg, source: str, processes: int = 1, warn=None) -> CPUEstimate | None:
    """Before any weights load: raise NotEnoughMemory when the estimate exceeds this machine's total
    RAM, call `warn(line)` when it exceeds what is available now. Silent (None) where there is nothing
    to check: the check switched off (GRPO_ZERO_SKIP_MEMORY_CHECK=1), a built-in tiny base, a config
    not readable offline, or a machine whose RAM is unknown. CPU runs only: the caller checks CUDA."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return None
    arch = cheap_arch(cfg.model.name_or_path)
    mem = machine_memory() if arch is not None else None
    if arch is None or mem is None:
        return None
    est = estimate_cpu_memory(cfg, arch, processes)
    need = est.total_gib
    what = f"{source}: this run needs about {need:.1f} GiB of memory on the CPU ({_count(est.params)} parameters of " \
           f"{arch.name})"
    if need > mem.total_gib:
        raise NotEnoughMemory(f"{what}, more than this machine's {mem.total_gib:.1f} GiB; try {advice(cfg, est)} "
                              f"(grpo plan {source} [the same overrides] --gpu cpu lists the parts; {SKIP_ENV}=1 skips this check)")
    if need > mem.available_gib and warn is not None:
        warn(f"{what}, more than the {mem.available_gib:.1f} GiB available now (of {mem.total_gib:.1f} GiB); it may be "
             "killed when memory runs out")
    return est


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cpu_report_rows(cfg, est: CPUEstimate, mem: MachineMemory | None) -> list[tuple[str, str]]:
    """The rows of `grpo plan RECIPE --gpu cpu`."""
    a = est.arch
    rows = [("model", f"{a.name}; {_count(est.params)} params, {est.dtype}"),
            ("machine", (f"{mem.total_gib:.1f} GiB total, {mem.available_gib:.1f} GiB available ({mem.source})"
                         if mem else "RAM unknown (no /proc/meminfo, no psutil)")
             + f"; {est.processes} training process(es); rollout engine {cfg.rollout.engine}")]
    for k, v in est.resident.items():
        rows.append((f"resident: {k}", f"{v:.2f} GiB"))
    for k, v in est.training.items():
        rows.append((f"update: {k}", f"{v:.2f} GiB"))
    for k, v in est.rollout.items():
        rows.append((f"rollout: {k}", f"{v:.2f} GiB"))
    rule = "gradients + the rest (several micro-batches)" if est.accumulates else \
        "the larger of gradients and the rest + the head's gradient (one micro-batch)"
    rows.append(("update peak", f"{est.update_gib:.2f} GiB: {rule}"))
    rows.append(("per training process", f"{est.per_process_gib:.2f} GiB (resident + the larger of update and rollout)"))
    for k, v in est.other.items():
        rows.append((f"other: {k}", f"{v:.2f} GiB"))
    rows.append(("total (estimate)", f"{est.total_gib:.1f} GiB"))
    if mem:
        fits = est.total_gib <= mem.total_gib
        verdict = ("yes" if est.total_gib <= mem.available_gib else "yes, but more than is available now") if fits else "NO"
        rows.append(("fits", f"{verdict}: {est.total_gib:.1f} GiB of {mem.total_gib:.1f} GiB total, "
                             f"{mem.available_gib:.1f} GiB available"))
        if not fits:
            rows.append(("does not fit", f"try {advice(cfg, est)}"))
    rows += [("note", n) for n in est.notes]
    return rows
