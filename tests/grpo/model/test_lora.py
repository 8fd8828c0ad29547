"""LoRA (grpo/model/lora.py) on tiny real Qwen3 / Qwen3-MoE models built from configs:

- adapters land on every decoder linear layer, never on the head nor the MoE router; `experts`
  adds the fused routed experts;
- after a real policy update only adapter parameters have gradients, the optimizer holds only them,
  the base weights are bit-identical and the adapter moved;
- the reference log-probs (the same module, adapters off) equal the untouched base model's, and
  beta > 0 loads no second copy;
- the transformers engine samples with the adapter in place (its logprobs are the adapted model's);
- the merged weights equal peft's own merge.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.algo.update import collate, frozen_logprobs, policy_update
from grpo.config import LoRAConfig, RunConfig, parse_recipe_dict
from grpo.model.loading import reference_model
from grpo.model.lora import BaseOfPolicy, adapter_payload, apply_lora, merged_state
from grpo.model.optim import make_optimizer
from rollout.base import Rollout, SamplingParams
from tests.conftest import tiny_qwen3

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
G = 4


def lora_model(kind: str = "moe", **lora):
    model, tok = tiny_qwen3(kind, tied=True)
    base = copy.deepcopy(model)
    return apply_lora(model, LoRAConfig(rank=4, alpha=8, **lora)), base, tok


def randomize_adapters(model, std: float = 0.3) -> None:
    """B is 0 at initialisation (the adapter changes nothing): draw it, so the adapter has an effect."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std, generator=torch.Generator().manual_seed(p.numel()))


def rollouts(vocab: int) -> list[Rollout]:
    g = torch.Generator().manual_seed(3)
    adv = [1.0, -1.0, 0.5, -0.5, 1.2, -0.2, -1.0, 0.0]
    out = []
    for i in range(8):
        prompt = torch.randint(3, vocab, (2 + i % 4,), generator=g).tolist()
        completion = torch.randint(3, vocab, (1 + i % 5,), generator=g).tolist()
        out.append(Rollout(group=i // G, prompt_ids=tuple(prompt), completion_ids=tuple(completion), text="",
                           logprobs=(0.0,) * len(completion), finish_reason="stop", advantage=adv[i]))
    return out


def config(**algorithm) -> RunConfig:
    return RunConfig.model_validate({"model": {"lora": {"rank": 4}}, "rollout": {"group_size": G},
                                     "algorithm": algorithm, "trainer": {"micro_batch_size": 4, "lr": 1e-2}})


def test_adapters_on_every_decoder_linear_never_on_head_or_router():
    model, _, _ = lora_model("moe")
    adapted = {name.split(".lora_A")[0].removeprefix("base_model.model.") for name, _ in model.named_parameters()
               if ".lora_A." in name}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with_experts, _, _ = lora_model("moe", experts=True)
    names = [n for n, _ in with_experts.named_parameters() if ".lora_A." in n]
    assert any(".mlp.experts." in n for n in names) and not any("mlp.gate." in n for n in names)
    dense, _, _ = lora_model("dense")
    leaves = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in dense.named_parameters() if ".lora_A." in n}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_only_adapters_get_gradients_and_the_base_stays_bit_identical():
    model, base, tok = lora_model("moe")
    cfg = config()
    optimizer = make_optimizer(model, cfg.trainer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert held == adapters and len(adapters) == 16  # 2 layers x 4 projections x (A, B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads: dict[str, bool] = {}
    step = optimizer.step

    def spy(*args, **kwargs):  # see the gradients the update produced, just before the step uses them
        grads.update({n: p.grad is not None for n, p in model.named_parameters()})
        return step(*args, **kwargs)

    optimizer.step = spy
    policy_update(model, optimizer, rollouts(len(tok)), cfg, pad_id=0, device=CPU)
    assert grads and all(has == ("lora_" in n) for n, has in grads.items())
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, before[n]), f"base parameter {n} changed"
    moved = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert len(moved) == 8


def test_reference_is_the_base_with_adapters_off_and_no_second_copy():
    model, base, tok = lora_model("dense")
    cfg = config(beta=0.1)
    ref = reference_model(cfg, model, CPU, resumed=False)
    assert isinstance(ref, BaseOfPolicy) and ref.policy is model
    optimizer = make_optimizer(model, cfg.trainer)
    for _ in range(2):  # the adapter moves away from B = 0, so policy and reference differ
        policy_update(model, optimizer, rollouts(len(tok)), cfg, pad_id=0, device=CPU, ref_model=ref)
    batch = collate(rollouts(len(tok)), pad_id=0)
    chunks = [slice(0, 8)]
    with ref.adapters_off() as module:
        assert module is model
        ref_lp = frozen_logprobs(module, batch, chunks, 1.0, 512)
    base_lp = frozen_logprobs(base, batch, chunks, 1.0, 512)
    policy_lp = frozen_logprobs(model, batch, chunks, 1.0, 512)  # adapters are back on after the block
    mask = batch["mask"] > 0
    assert torch.equal(ref_lp[mask], base_lp[mask])
    assert (policy_lp - base_lp)[mask].abs().max() > 1e-3


def test_ref_refresh_is_refused_with_lora():
    with pytest.raises(Exception, match="ref_refresh_steps cannot be used with model.lora"):
        parse_recipe_dict({"model": {"lora": {}}, "algorithm": {"beta": 0.1, "ref_refresh_steps": 10}}, "r.yaml")


def test_the_transformers_engine_samples_with_the_adapter():
    from rollout.hf.engine import HFEngine

    model, base, tok = lora_model("dense")
    randomize_adapters(model)
    engine = HFEngine(model, tok, CPU)
    out = engine.generate([[5, 6, 7], [8, 9]], 2, SamplingParams(max_new_tokens=6, ignore_eos=True, seed=1))

    def scored(m, r):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            lp = m(ids).logits[0, len(r.prompt_ids) - 1:-1].float().log_softmax(-1)
        return lp.gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]

    for r in out:
        assert (scored(model, r) - torch.tensor(r.logprobs)).abs().max() < 1e-5
    assert max((scored(base, r) - torch.tensor(r.logprobs)).abs().max().item() for r in out) > 1e-2


def test_merged_weights_equal_peft_merge_and_the_payload_is_peft_format():
    model, base, _ = lora_model("dense")
    randomize_adapters(model)
    merged = merged_state(model)
    assert set(merged) == set(base.state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    experts, _, _ = lora_model("moe", experts=True)  # adapters on the fused routed experts merge too
    randomize_adapters(experts)
    merged = merged_state(experts)
    expected = copy.deepcopy(experts).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    tensors, cfg = adapter_payload(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"


def test_qlora_is_refused_on_cpu_in_one_line():
    from grpo.config import ModelConfig
    from grpo.model.loading import load_policy
    from grpo.model.lora import LoRAError

    cfg = ModelConfig(name_or_path="/nonexistent/model", lora=LoRAConfig(load_in_4bit=True))
    with pytest.raises(LoRAError, match=r"^model.lora.load_in_4bit: a 4-bit base \(QLoRA, bitsandbytes\) needs a CUDA "
                                        r"device, this run is on cpu; set model.lora.load_in_4bit=false$"):
        load_policy(cfg, CPU)  # refused before anything loads (the path does not even exist)


@pytest.mark.gpu
def test_qlora_trains_adapters_on_a_4bit_base(tmp_path):
    """QLoRA on CUDA: the base loads in 4-bit NF4 (bitsandbytes), the update moves only the adapters."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install grpo-zero[qlora])")
    from grpo.config import ModelConfig
    from grpo.model.loading import load_policy

    base, tok = tiny_qwen3("dense", tied=False)
    base.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cuda = torch.device("cuda")
    model, _ = load_policy(ModelConfig(name_or_path=str(tmp_path), dtype="bfloat16",
                                       lora=LoRAConfig(rank=4, load_in_4bit=True)), cuda)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    cfg = config()
    optimizer = make_optimizer(model, cfg.trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    policy_update(model, optimizer, rollouts(len(tok)), cfg, pad_id=0, device=cuda)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_merge_lora_writes_a_plain_model_with_the_adapted_outputs(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from grpo.cli import main

    model, base, tok = lora_model("dense")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "run" / "final")
    tok.save_pretrained(tmp_path / "run" / "final")
    assert main(["merge-lora", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "again")]) == 2  # no adapter there
    assert "no LoRA adapter here" in capsys.readouterr().err
