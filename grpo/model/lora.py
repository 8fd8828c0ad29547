"""LoRA for RL: low-rank adapters (`peft`) on a frozen base, the base as the reference policy.

    model = apply_lora(base, cfg.model.lora)               # a fresh adapter (B = 0: the policy is the base)
    model = apply_lora(base, cfg.model.lora, adapter=DIR)  # a saved one (a checkpoint's model/, or final/)

- Targets: every `nn.Linear` of the decoder by default (attention and dense MLPs, an MoE's shared
  expert), never the output head (tied to the embedding in the small models) nor an MoE router
  (`mlp.gate`, whose top-k choice LoRA would make jump). `lora.experts` adds peft's adapters on the
  fused routed-expert tensors (`target_parameters`: the 3-D `gate_up_proj` / `down_proj`).
- Only adapter parameters require grad, so the optimizer (`grpo.model.optim.make_optimizer`) holds
  only them and backward computes no base-weight gradient.
- The reference policy of the KL term is the same module with its adapters off (`BaseOfPolicy`):
  no second copy of the model is loaded.
- Weight sync: `adapter_payload` (the adapter's tensors and config in PEFT's file format, for vLLM's
  LoRA support) or `merged_state` (base + scale * B A under the base's own names, for an engine
  without LoRA: `model.lora.sync: merged`, or vLLM's CPU build with an MoE model); see
  `grpo.run.step.sync_engine`.
- `lora.dropout` acts in the gradient forward only (`grpo.algo.update`): the trainer keeps the policy
  in eval mode, as the sampler runs it.
- QLoRA (`lora.load_in_4bit`) loads the base in 4-bit NF4 through bitsandbytes, CUDA only
  (`check_quantization` refuses it elsewhere in one line).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from grpo.config import LoRAConfig
from grpo.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


class LoRAError(UserError):
    """A LoRA set-up that cannot work, phrased for a person."""


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether `path` holds a PEFT adapter (adapter_config.json) rather than a full model."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str | None:
    """The base model a saved adapter names (`base_model_name_or_path`), if any."""
    raw = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return raw.get("base_model_name_or_path")


def check_quantization(lora: LoRAConfig | None, device: torch.device) -> None:
    """QLoRA needs CUDA and bitsandbytes: one line saying so anywhere else."""
    if lora is None or not lora.load_in_4bit:
        return
    if torch.device(device).type != "cuda":
        raise LoRAError(f"model.lora.load_in_4bit: a 4-bit base (QLoRA, bitsandbytes) needs a CUDA device, this run "
                        f"is on {torch.device(device).type}; set model.lora.load_in_4bit=false")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoRAError("model.lora.load_in_4bit: bitsandbytes is not installed (pip install bitsandbytes)") from None


def quantization_kwargs(lora: LoRAConfig | None, dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments of a 4-bit base (QLoRA), else none."""
    if lora is None or not lora.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)}


def _routed_expert_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """{module name: its 3-D parameter names}: the fused routed experts of an MoE (transformers 5)."""
    out = {}
    for name, module in model.named_modules():
        fused = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if fused:
            out[name] = fused
    return out


def default_targets(model: torch.nn.Module) -> list[str]:
    """Suffixes of every decoder `nn.Linear` except the output head and MoE routers (sorted)."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or name.endswith("mlp.gate"):
            continue
        names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise LoRAError(f"model.lora: {type(model).__name__} has no linear layers to adapt; name them in "
                        "model.lora.target_modules")
    return sorted(names)


def lora_config(model: torch.nn.Module, lora: LoRAConfig):
    """peft's `LoraConfig` for this model and recipe section."""
    from peft import LoraConfig

    targets = lora.target_modules or default_targets(model)
    expert_params = []
    if lora.experts:
        expert_params = sorted({f"{name.rsplit('.', 1)[-1]}.{p}" for name, ps in _routed_expert_modules(model).items()
                                for p in ps})
        if not expert_params:
            raise LoRAError(f"model.lora.experts: {type(model).__name__} has no fused routed experts to adapt")
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      target_parameters=expert_params or None, bias="none",
                      task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, lora: LoRAConfig, adapter: str | Path | None = None, seed: int | None = None):
    """The base wrapped by peft with a trainable adapter: a fresh one (peft's initialisation: A
    random, B zero, drawn from torch's global RNG, or with `seed` from its own, so that every rank
    of a run and a run that built its base first draw the same adapter) or the one saved in
    `adapter`. Every base parameter is frozen; only the adapter's require grad."""
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    elif seed is None:
        peft_model = get_peft_model(model, lora_config(model, lora))
    else:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, lora_config(model, lora))
    frozen = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if frozen:  # peft trains nothing else with bias="none"; a base weight that requires grad is a bug
        raise LoRAError(f"model.lora: base parameters left trainable: {frozen[:3]}")
    return peft_model


def adapter_rank(model) -> int | None:
    """The largest adapter rank of a peft model (what vLLM's `max_lora_rank` must hold); None
    for a plain model."""
    if not is_lora(model):
        return None
    config = peft_of(model).peft_config["default"]
    return max([config.r, *(config.rank_pattern or {}).values()])


def is_lora(model) -> bool:
    """Whether `model` (or the module a DDP wrapper holds) is a peft model."""
    return hasattr(getattr(model, "module", model), "peft_config")


def peft_of(model):
    """The peft model inside a DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "peft_config") else model


class BaseOfPolicy:
    """The reference policy of a LoRA run: the policy module itself, with its adapters turned off
    for the forward. Holds no weights of its own. `grpo.algo.update.policy_update` computes the
    reference log-probs inside `adapters_off()`, with the module it yields."""

    def __init__(self, policy):
        self.policy = policy

    @contextlib.contextmanager
    def adapters_off(self):
        """Inside: the peft model with its adapters disabled (peft's `disable_adapter`), re-enabled
        on the way out."""
        peft_model = peft_of(self.policy)
        with peft_model.disable_adapter():
            yield peft_model


def adapter_payload(model, state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of the adapter in PEFT's file format (`adapter_model.safetensors` keys
    without the adapter name, `adapter_config.json`), as vLLM loads an adapter. `state`: the
    adapter's unsharded tensors under the peft model's names (`grpo.run.checkpoint.lora_state`,
    needed under FSDP2), else the module's own."""
    from peft import get_peft_model_state_dict

    peft_model = peft_of(model)
    tensors = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model, state_dict=state).items()}
    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return tensors, json.loads(json.dumps(config, default=str))


def merged_state(model) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names, each adapted weight merged (W + scale *
    B A, peft's `get_delta_weight`: linear layers, and fused routed experts' tensors adapted through
    `target_parameters`); the live module is not changed."""
    from peft.tuners.lora import LoraLayer

    inner = peft_of(model).get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            # the adapted tensor sits under the chain of wrapped layers (peft nests one per adapted parameter)
            depth, base = 1, module.base_layer
            while isinstance(base, LoraLayer):
                depth, base = depth + 1, base.base_layer
            leaf = getattr(module, "parameter_name", None) or "weight"
            deltas[f"{name}{'.base_layer' * depth}.{leaf}"] = module.get_delta_weight("default")
        out = {}
        for key, value in inner.state_dict().items():
            if "lora_" in key:
                continue
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            while ".base_layer." in key:
                key = key.replace(".base_layer.", ".")
            out[key] = value.detach()
    return out


def merge_to_directory(base: torch.nn.Module, adapter: str | Path, tokenizer, out: str | Path) -> Path:
    """Base + the adapter in `adapter`, merged for good (peft's `merge_and_unload`), saved as a plain
    Hugging Face model with its tokenizer in `out`."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
