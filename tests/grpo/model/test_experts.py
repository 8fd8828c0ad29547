"""The sorted-dispatch experts forward (grpo/model/experts.py) against transformers' eager experts:
same outputs and the same gradients (float64), on four MoE families, with and without tokens
routed to expert-parallel sentinels."""

from __future__ import annotations

import pytest
import torch

from grpo.model.experts import NAME, experts_implementation, register, sorted_experts_forward
from tests.grpo.algo.test_moe import tiny_moe

FAMILIES = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"]


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    loss = (out * weights).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_sorted_matches_eager_values_and_gradients(family):
    model, _ = tiny_moe(family)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # a left-padded row
    eager_out, eager_grads = _loss_and_grads(model, ids, mask)
    model.set_experts_implementation(register())
    assert model.config._experts_implementation == NAME
    sorted_out, sorted_grads = _loss_and_grads(model, ids, mask)
    assert torch.allclose(sorted_out, eager_out, atol=1e-12, rtol=0)
    assert eager_grads.keys() == sorted_grads.keys()
    experts_grads = [n for n in eager_grads if "experts" in n]
    assert experts_grads, "the experts received no gradient"
    for name, grad in eager_grads.items():
        assert torch.allclose(sorted_grads[name], grad, atol=1e-11, rtol=0), name


def test_sentinel_expert_ids_are_skipped():
    model, _ = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts.double()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, model.config.hidden_size, dtype=torch.float64, generator=gen)
    index = torch.tensor([[0, 8], [3, 1], [8, 8], [7, 2], [2, 8], [5, 4]])  # 8 = a sentinel (not on this rank)
    weights = torch.rand(6, 2, dtype=torch.float64, generator=gen)
    weights = torch.where(index == 8, torch.zeros_like(weights), weights)
    got = sorted_experts_forward(experts, hidden, index, weights)
    expected = torch.zeros_like(hidden)
    for t in range(6):
        for slot in range(2):
            e = int(index[t, slot])
            if e == 8:
                continue
            gate, up = (hidden[t] @ experts.gate_up_proj[e].T).chunk(2)
            expected[t] += weights[t, slot] * (experts.act_fn(gate) * up) @ experts.down_proj[e].T
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # both slots elsewhere: nothing here


def test_policy_loads_with_sorted_experts_on_cpu_only():
    assert experts_implementation(None, torch.device("cpu")) == NAME
    assert experts_implementation(None, torch.device("cuda")) is None  # transformers' default there
    assert experts_implementation("eager", torch.device("cpu")) == "eager"  # the recipe's choice wins


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_loop_matches_eager_too(family, monkeypatch):
    """With padding ruled out, the per-expert loop runs; same values and gradients."""
    import grpo.model.experts

    monkeypatch.setattr(grpo.model.experts, "PADDED_MAX_WASTE", 0.0)
    test_sorted_matches_eager_values_and_gradients(family)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_padded_products_match_eager(family, monkeypatch):
    """With any padding allowed, the batched (padded) products run; same values and gradients."""
    import grpo.model.experts

    monkeypatch.setattr(grpo.model.experts, "PADDED_MAX_WASTE", float("inf"))
    test_sorted_matches_eager_values_and_gradients(family)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_grouped_products_match_eager_in_float32(family, monkeypatch):
    """Uneven load in float32 on CPU: torch._grouped_mm runs (counted) and matches eager to float32
    rounding, values and gradients."""
    import grpo.model.experts

    if not grpo.model.experts._grouped_mm_works(torch.zeros(1, dtype=torch.float32)):
        pytest.skip("torch._grouped_mm does not run here")
    monkeypatch.setattr(grpo.model.experts, "PADDED_MAX_WASTE", 0.0)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, _ = tiny_moe(family)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    eager_out, eager_grads = _loss_and_grads(model, ids, mask)
    model.set_experts_implementation(register())
    sorted_out, sorted_grads = _loss_and_grads(model, ids, mask)
    assert len(calls) == 2 * model.config.num_hidden_layers  # gate/up and down, every layer
    torch.testing.assert_close(sorted_out, eager_out, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        assert ((sorted_grads[name] - grad).norm() / grad.norm().clamp(min=1e-30)).item() < 1e-5, name


def test_grouped_probe_is_not_fooled_by_inference_mode(monkeypatch):
    """The engine's prefill is the first caller, under inference mode; the probe must still find
    out whether the grouped product works with autograd (it did not, and was cached as False)."""
    import grpo.model.experts

    monkeypatch.setattr(grpo.model.experts, "_GROUPED_MM_WORKS", {})
    with torch.inference_mode():
        inside = grpo.model.experts._grouped_mm_works(torch.zeros(1, dtype=torch.float32))
    monkeypatch.setattr(grpo.model.experts, "_GROUPED_MM_WORKS", {})
    assert inside == grpo.model.experts._grouped_mm_works(torch.zeros(1, dtype=torch.float32))
