"""The colocated vLLM engine with LoRA adapters pushed as adapters (`VLLMEngine.update_adapter`), on
vLLM's CPU build: a tiny dense Qwen3 (head_dim 32) saved as the base, a peft adapter trained by three
real AdamW steps. After each step the adapter is pushed (`grpo.run.step.sync_engine` with
`model.lora.sync: adapter`) and vLLM's logprobs of its own samples must match the transformers
forward of the adapted model to 1e-4; before each push the same check must fail (so a skipped push
is caught), and the base weights are never sent.
"""

from __future__ import annotations

import pytest
import torch

from grpo.config import LoRAConfig
from grpo.model.lora import apply_lora
from grpo.run.step import sync_engine
from tests.conftest import require_vllm, tiny_qwen3
from tests.rollout.test_vllm_colocated import TOL, max_logprob_error

require_vllm()


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from rollout.vllm.engine import VLLMEngine

    base, tok = tiny_qwen3("dense", tied=False)
    path = tmp_path_factory.mktemp("lora-base")
    base.save_pretrained(path)
    tok.save_pretrained(path)
    engine = VLLMEngine(str(path), dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=32 << 20,
                        lora_rank=4)
    torch.manual_seed(0)
    model = apply_lora(base, LoRAConfig(rank=4, alpha=16)).eval()
    yield engine, model
    engine.close()


def adapter_step(model, opt, seed: int) -> None:
    """One real AdamW step of the adapter on a language-modelling loss."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, model.config.vocab_size, (4, 24), generator=g)  # [B, T]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_vllm_logprobs_match_the_adapted_model_after_three_adapter_pushes(lora_setup, monkeypatch):
    engine, model = lora_setup
    pushed = []
    monkeypatch.setattr(engine, "update_weights", lambda weights: pushed.append("weights"))  # never called
    sync_engine(engine, model, model, "adapter")  # the fresh adapter (B = 0): the base itself
    assert max_logprob_error(engine, model) < TOL
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    roots = set()
    for step in range(3):
        adapter_step(model, opt, seed=step)
        stale = max_logprob_error(engine, model)  # the push skipped: vLLM still samples the previous adapter
        assert stale > 100 * TOL, f"step {step}: the adapter step changed nothing measurable"
        sync_engine(engine, model, model, "adapter")
        error = max_logprob_error(engine, model)
        assert error < TOL, f"after push {step + 1}, vLLM and transformers differ by {error:.2e}"
        roots.add(engine._adapters.request.lora_int_id)
    assert pushed == [] and len(roots) == 3  # three adapter versions, no full-weight push
    assert engine.llm.llm_engine.list_loras() == {engine._adapters.version}  # the old versions were removed
