"""Tests of the pure parts of the vLLM engines (`rollout/vllm/`), which need no vLLM.

The parameter-name mapping on a real tiny Qwen3-MoE, sampling-parameter mapping, TP-group
splitting, seeds, output conversion, and the fact that importing the package does not import vLLM.
The output-conversion tests feed hand-built stand-ins of vLLM's `RequestOutput` and of the
server's JSON (their names say `fake`) to pin edge cases (routing padding, aborted requests) that
the real engine rarely produces. The real engine runs in `tests/rollout/test_vllm_colocated.py` (and the
server in `tests/rollout/test_vllm_server.py`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rollout.base import Rollout, SamplingParams
from rollout.vllm.layout import flatten_gathered, request_seeds, tp_groups
from rollout.vllm.requests import (
    completion_response_to_rollouts,
    filter_engine_kwargs,
    request_output_to_rollouts,
    to_vllm_sampling_kwargs,
)
from rollout.vllm.weights import expert_layout, hf_to_vllm_weights
from tests.conftest import ROOT

REPO = ROOT

# --- a tiny Qwen3-MoE with a character tokenizer, built locally ---------------------------------

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=<>()."
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def tiny_config(**overrides):
    from transformers import Qwen3MoeConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(tiny_config(**overrides)).eval()


def save_tiny_checkpoint(path: Path, model) -> Path:
    """The model plus a character-level fast tokenizer, as vLLM loads them from disk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= model.config.vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


# --- import hygiene -------------------------------------------------------------------------------


# every module of the `rollout` package, imported one by one; then the vLLM door's lazy names
IMPORT_ALL_ROLLOUT = """
import importlib, pkgutil, sys
import rollout
names = sorted(m.name for m in pkgutil.walk_packages(rollout.__path__, "rollout."))
assert {"rollout.hf.engine", "rollout.vllm.engine", "rollout.vllm.server", "rollout.vllm.worker"} <= set(names), names
for name in names:
    importlib.import_module(name)
import rollout.vllm
assert rollout.vllm.VLLMEngine.__module__ == "rollout.vllm.engine"
assert rollout.vllm.VLLMServerClient.__module__ == "rollout.vllm.server"
loaded = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "vllm" and v is not None)
assert not loaded, f"vllm imported: {loaded[:5]}"
"""


def test_importing_the_package_does_not_import_vllm():
    subprocess.run([sys.executable, "-c", IMPORT_ALL_ROLLOUT], cwd=REPO, check=True, timeout=120)


def test_the_package_imports_where_vllm_is_missing():
    # `sys.modules["vllm"] = None` makes every `import vllm` fail, as on a machine without it
    code = "import sys; sys.modules['vllm'] = None\n" + IMPORT_ALL_ROLLOUT
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --- parameter names ------------------------------------------------------------------------------

EXPERT_NAME = r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$"


def test_every_qwen3_moe_parameter_maps_to_its_checkpoint_name_and_shape():
    model = tiny_model()
    state = model.state_dict()
    # transformers v5 keeps experts fused: [E, 2*I, H] and [E, H, I].
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    assert state["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 16)

    mapped = dict(hf_to_vllm_weights(state.items(), model_type="qwen3_moe"))

    # 25 state_dict entries: 2 fused expert tensors per layer become 4 experts x 3 = 12 -> 25 - 4 + 24.
    assert len(state) == 25 and len(mapped) == 45
    assert mapped["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (16, 32)  # [I, H]
    assert mapped["model.layers.0.mlp.experts.3.up_proj.weight"].shape == (16, 32)
    assert mapped["model.layers.1.mlp.experts.0.down_proj.weight"].shape == (32, 16)  # [H, I]
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(mapped["model.layers.1.mlp.experts.2.gate_proj.weight"], fused[2, :16])
    assert torch.equal(mapped["model.layers.1.mlp.experts.2.up_proj.weight"], fused[2, 16:])
    # Non-expert names pass through unchanged (vLLM fuses q/k/v itself).
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight", "lm_head.weight"):
        assert torch.equal(mapped[name], state[name])
    # Every expert tensor has the `experts.{e}.{proj}.` form vLLM's expert mapping matches.
    import re

    experts = [n for n in mapped if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and all(re.match(EXPERT_NAME, n) for n in experts)
    # The pieces are views of the fused parameter: no copy of the experts.
    piece = mapped["model.layers.0.mlp.experts.1.down_proj.weight"]
    assert piece.untyped_storage().data_ptr() == state["model.layers.0.mlp.experts.down_proj"].untyped_storage().data_ptr()


def test_mapping_matches_what_transformers_writes_to_disk(tmp_path):
    """save_pretrained reverts transformers' own fusion; our names and tensors must be the same."""
    from safetensors.torch import load_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    mapped = dict(hf_to_vllm_weights(model.state_dict().items(), model_type=model.config.model_type))
    assert sorted(mapped) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(mapped[name], tensor), name


def test_mapping_strips_wrappers_and_drops_tied_lm_head():
    w = torch.zeros(2, 2)
    named = [
        ("module.model.embed_tokens.weight", w),
        ("model._orig_mod.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight", w),
        ("lm_head.weight", w),
    ]
    names = [n for n, _ in hf_to_vllm_weights(named, tie_word_embeddings=True)]
    assert names == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_mixtral_experts_use_w1_w3_w2_under_block_sparse_moe():
    # 2 experts, I = 1, H = 2: gate rows first, then up rows.
    gate_up = torch.arange(8.0).reshape(2, 2, 2)  # [E=2, 2I=2, H=2]
    down = torch.arange(4.0).reshape(2, 2, 1)  # [E=2, H=2, I=1]
    named = [("model.layers.0.mlp.experts.gate_up_proj", gate_up), ("model.layers.0.mlp.experts.down_proj", down)]
    mapped = dict(hf_to_vllm_weights(named, model_type="mixtral"))
    assert list(mapped) == [
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.0.block_sparse_moe.experts.0.w3.weight",
        "model.layers.0.block_sparse_moe.experts.1.w1.weight",
        "model.layers.0.block_sparse_moe.experts.1.w3.weight",
        "model.layers.0.block_sparse_moe.experts.0.w2.weight",
        "model.layers.0.block_sparse_moe.experts.1.w2.weight",
    ]
    assert mapped["model.layers.0.block_sparse_moe.experts.1.w1.weight"].tolist() == [[4.0, 5.0]]
    assert mapped["model.layers.0.block_sparse_moe.experts.1.w3.weight"].tolist() == [[6.0, 7.0]]
    assert mapped["model.layers.0.block_sparse_moe.experts.1.w2.weight"].tolist() == [[2.0], [3.0]]
    assert expert_layout("qwen2_moe").gate == "gate_proj"
    # the router moves with its block (transformers renames every key of the family, not only experts)
    router = dict(hf_to_vllm_weights([("model.layers.0.mlp.gate.weight", torch.zeros(2, 2))], model_type="mixtral"))
    assert list(router) == ["model.layers.0.block_sparse_moe.gate.weight"]
    kept = dict(hf_to_vllm_weights([("model.layers.0.mlp.gate.weight", torch.zeros(2, 2))], model_type="qwen3_moe"))
    assert list(kept) == ["model.layers.0.mlp.gate.weight"]


def test_mapping_rejects_a_malformed_fused_tensor():
    with pytest.raises(ValueError, match="not even"):
        list(hf_to_vllm_weights([("m.layers.0.mlp.experts.gate_up_proj", torch.zeros(2, 3, 4))]))


# --- sampling parameters and engine arguments ----------------------------------------------------


def test_sampling_params_map_to_vllm_conventions():
    sampling = SamplingParams(
        max_new_tokens=32, temperature=0.7, top_p=0.9, top_k=0, stop=("</answer>",), stop_token_ids=(7,), seed=3
    )
    assert to_vllm_sampling_kwargs(sampling, n=8) == {
        "n": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,  # our 0 = off -> vLLM's -1 = off
        "max_tokens": 32,
        "stop": ["</answer>"],
        "stop_token_ids": [7],
        "include_stop_str_in_output": True,
        "ignore_eos": False,
        "logprobs": 0,  # the sampled token's logprob only
        "seed": 3,
    }
    kwargs = to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=4, top_k=20, ignore_eos=True), n=1)
    assert kwargs["top_k"] == 20 and kwargs["ignore_eos"] is True and "seed" not in kwargs
    with pytest.raises(ValueError):
        to_vllm_sampling_kwargs(sampling, n=0)


def test_engine_kwargs_unknown_to_this_vllm_are_split_off():
    kept, dropped = filter_engine_kwargs(
        {"seed": 1, "logprobs_mode": "processed_logprobs", "enable_return_routed_experts": True},
        accepted={"seed", "logprobs_mode"},
    )
    assert kept == {"seed": 1, "logprobs_mode": "processed_logprobs"}
    assert dropped == ["enable_return_routed_experts"]


# --- tensor-parallel groups ------------------------------------------------------------------------


def test_tp_groups_are_consecutive_ranks():
    assert tp_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert tp_groups(4, 4) == [[0, 1, 2, 3]]
    assert tp_groups(1, 1) == [[0]]
    with pytest.raises(ValueError):
        tp_groups(6, 4)


def test_gathered_prompts_split_back_to_their_ranks():
    # A TP group of 3 ranks holding 2, 0 and 1 prompts; every rank runs the flat batch and keeps
    # its slice of the (identical) outputs.
    per_rank = [[[1, 2], [3]], [], [[4, 5, 6]]]
    flat, offsets = flatten_gathered(per_rank)
    assert flat == [[1, 2], [3], [4, 5, 6]] and offsets == [0, 2, 2, 3]
    for rank, prompts in enumerate(per_rank):
        assert flat[offsets[rank] : offsets[rank + 1]] == prompts


def test_request_seeds_give_every_completion_its_own_seed():
    # vLLM seeds completion j of a request with seed + j, so 3 requests x n=4 need steps of 4.
    seeds = request_seeds(100, 3, 4)
    assert seeds == [100, 104, 108]
    children = [s + j for s in seeds for j in range(4)]
    assert len(set(children)) == 12


# --- outputs -> Rollout ----------------------------------------------------------------------------


def fake_completion(index, token_ids, logprobs, finish_reason="stop", text="", routed=None):
    # vLLM's sample logprobs: one {token_id: Logprob(logprob=...)} per generated token.
    entries = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(token_ids, logprobs)]
    return SimpleNamespace(
        index=index, token_ids=token_ids, logprobs=entries, finish_reason=finish_reason, text=text, routed_experts=routed
    )


def test_fake_request_output_becomes_rollouts_of_one_group():
    """A hand-built stand-in for vLLM's RequestOutput (vLLM cannot run on CPU)."""
    out = SimpleNamespace(
        prompt_token_ids=[5, 6, 7],
        outputs=[  # out of order on purpose: rollouts follow `.index`
            fake_completion(1, [9], [-0.5], "length", "x"),
            fake_completion(0, [8, 1], [-0.25, -1.5], "stop", "ab"),
        ],
    )
    rollouts = request_output_to_rollouts(out, group=4)
    assert rollouts == [
        Rollout(group=4, prompt_ids=(5, 6, 7), completion_ids=(8, 1), text="ab", logprobs=(-0.25, -1.5), finish_reason="stop"),
        Rollout(group=4, prompt_ids=(5, 6, 7), completion_ids=(9,), text="x", logprobs=(-0.5,), finish_reason="length"),
    ]


def test_fake_request_output_routing_is_padded_to_every_token():
    """vLLM returns routing for all tokens but the last sampled one; the last row becomes -1."""
    import numpy as np

    routed = np.array([[[0, 1]], [[2, 3]], [[1, 0]]], dtype=np.int16)  # [P + C - 1 = 3, L=1, K=2]
    out = SimpleNamespace(prompt_token_ids=[5, 6], outputs=[fake_completion(0, [8, 9], [-1.0, -2.0], routed=routed)])
    (rollout,) = request_output_to_rollouts(out, group=0, record_routing=True)
    assert rollout.routed_experts.tolist() == [[[0, 1]], [[2, 3]], [[1, 0]], [[-1, -1]]]
    with pytest.raises(RuntimeError, match="enable_return_routed_experts"):
        request_output_to_rollouts(
            SimpleNamespace(prompt_token_ids=[5], outputs=[fake_completion(0, [8], [-1.0])]), 0, record_routing=True
        )


def test_fake_aborted_request_is_an_error():
    out = SimpleNamespace(prompt_token_ids=[5], outputs=[fake_completion(0, [8], [-1.0], finish_reason="abort")])
    with pytest.raises(RuntimeError, match="abort"):
        request_output_to_rollouts(out, group=0)


def fake_completions_json(token_ids_field: bool):
    def choice(index, ids, lps, reason, text):
        c = {"index": index, "text": text, "finish_reason": reason, "logprobs": {"token_logprobs": lps}}
        if token_ids_field:
            c["token_ids"] = ids
        else:
            c["logprobs"]["tokens"] = [f"token_id:{t}" for t in ids]
        return c

    # 2 prompts x n=2, choices deliberately shuffled.
    return {
        "choices": [
            choice(3, [4], [-0.1], "length", "d"),
            choice(0, [1, 2], [-0.2, -0.3], "stop", "ab"),
            choice(2, [3], [-0.4], "stop", "c"),
            choice(1, [9], [-0.5], "length", "z"),
        ]
    }


@pytest.mark.parametrize("token_ids_field", [True, False])
def test_fake_completions_json_becomes_prompt_major_rollouts(token_ids_field):
    """A hand-written stand-in for vllm serve's /v1/completions answer."""
    rollouts = completion_response_to_rollouts(fake_completions_json(token_ids_field), [[7, 7], [8]], n=2)
    assert [r.group for r in rollouts] == [0, 0, 1, 1]
    assert [r.completion_ids for r in rollouts] == [(1, 2), (9,), (3,), (4,)]
    assert [r.prompt_ids for r in rollouts] == [(7, 7), (7, 7), (8,), (8,)]
    assert rollouts[0].logprobs == (-0.2, -0.3) and rollouts[0].finish_reason == "stop"
    assert rollouts[3].text == "d" and rollouts[3].finish_reason == "length"
