"""Chunked log-probs (grpo/algo/logprobs.py) against the plain full-logits computation, on tiny real
transformers models (a Qwen3-MoE and a dense Llama built from configs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from grpo.algo.logprobs import token_logprobs, token_logprobs_plain

VOCAB = 50


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_moe() -> torch.nn.Module:
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM._from_config(config, experts_implementation="eager").double()


def tiny_llama() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 11), generator=g)  # [B, S]
    attention_mask = torch.ones(3, 11, dtype=torch.long)  # [B, S]; right padding on rows 1 and 2
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("make_model", [tiny_moe, tiny_llama], ids=["qwen3-moe", "llama"])
@pytest.mark.parametrize("chunk", [1, 3, 10, 1024])
def test_chunked_matches_plain_values_entropy_and_gradients(make_model, chunk):
    model = make_model()
    ids, am = batch()
    weights = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # [B, S-1]

    lp, entropy = token_logprobs(model, ids, am, temperature=0.7, with_entropy=True, chunk=chunk)  # [B, S-1] x2
    (lp * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    ref = token_logprobs_plain(model, ids, am, temperature=0.7)  # [B, S-1]
    (ref * weights).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    with torch.no_grad():  # entropy of the same tempered distribution, from full logits
        logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
        logp = F.log_softmax(logits[:, :-1] / 0.7, dim=-1)  # [B, S-1, V]
        torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-12)


def test_no_grad_path_and_entropy_off():
    model = tiny_moe()
    ids, am = batch()
    with torch.no_grad():
        lp, entropy = token_logprobs(model, ids, am, chunk=4)
        ref = token_logprobs_plain(model, ids, am)
    assert entropy is None and not lp.requires_grad
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-12)


def test_backward_keeps_no_full_logits(monkeypatch):
    """Autograd saves nothing of size [B, S-1, V] or [B, chunk > 4, V]: the chunks are recomputed
    (when the batch's logits are over CHECKPOINT_ABOVE_BYTES; here the threshold is set to 0)."""
    import grpo.algo.logprobs

    monkeypatch.setattr(grpo.algo.logprobs, "CHECKPOINT_ABOVE_BYTES", 0)
    model = tiny_moe()
    ids, am = batch()
    saved = saved_shapes(lambda: token_logprobs(model, ids, am, chunk=4))
    vocab_sized = [s for s in saved if s and s[-1] == VOCAB and len(s) == 3]
    assert all(s[1] <= 4 for s in vocab_sized), vocab_sized

    saved = saved_shapes(lambda: token_logprobs_plain(model, ids, am))
    assert any(s[-1] == VOCAB and len(s) == 3 and s[1] >= 10 for s in saved)  # the test can fail: plain keeps them


def test_small_logits_are_kept_rather_than_recomputed():
    """Under CHECKPOINT_ABOVE_BYTES (3 x 10 x 50 float32 here) the chunk's log-softmax is saved
    for backward instead of being recomputed."""
    model = tiny_moe()
    ids, am = batch()
    assert (3, 4, VOCAB) in saved_shapes(lambda: token_logprobs(model, ids, am, chunk=4))


def saved_shapes(forward) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for backward while `forward()` runs."""
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return saved
