"""Parameter names: transformers state_dict -> what vLLM's `load_weights` accepts.

`hf_to_vllm_weights` renames (and splits fused experts of) the policy's parameters, using each
model family's checkpoint naming of experts (`ExpertLayout`, `expert_layout`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

import torch

__all__ = ["ExpertLayout", "expert_layout", "hf_to_vllm_weights"]


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
