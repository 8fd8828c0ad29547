"""LoRA adapters pushed to a real vLLM server (`VLLMServerClient.update_adapter`), on vLLM's CPU build.

A vLLM OpenAI server runs for the module with `--enable-lora` (runtime adapter loading allowed),
serving a tiny dense Qwen3 (vLLM's CPU build runs no LoRA on MoE layers) in float32. The client
writes each adapter version to RAM and loads it through `POST /v1/load_lora_adapter`, unloading
the one before. The checks: after each of three real AdamW steps on the adapter, the logprobs the
server reports for its samples match the transformers forward of the adapted model to 1e-4 (and
miss it before the push, so a skipped push fails); an asynchronous LoRA run (`trainer.max_staleness=1`)
samples through the server with the adapter versions its steps need.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo.config import LoRAConfig
from grpo.model.lora import apply_lora
from grpo.run.step import sync_engine
from rollout.vllm.server import VLLMServerClient
from tests.conftest import require_vllm, tiny_qwen3
from tests.rollout.test_vllm_lora import adapter_step
from tests.rollout.test_vllm_server import (
    PLAIN,
    PROMPTS,
    STARTUP_S,
    TOL,
    max_logprob_error,
    start_server,
    stop_server,
    train_async_through,
    wait_for_health,
)

require_vllm()
pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-lora-server")
    base, tok = tiny_qwen3("dense", tied=False)
    base.save_pretrained(root / "tiny-dense")
    tok.save_pretrained(root / "tiny-dense")
    proc, url = start_server(root / "tiny-dense", root / "server.log",
                             extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
                             extra_args=("--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"))
    try:
        wait_for_health(url, proc, root / "server.log", STARTUP_S)
        yield SimpleNamespace(url=url, base=base, model_dir=root / "tiny-dense")
    finally:
        stop_server(proc)


def served_adapters(client: VLLMServerClient) -> list[str]:
    return [m["id"] for m in client._request("GET", "/v1/models")["data"] if m.get("parent")]


def test_the_server_samples_from_each_pushed_adapter_version(server, monkeypatch):
    client = VLLMServerClient(server.url, device="cpu")
    monkeypatch.setattr(client, "update_weights", lambda weights: pytest.fail("full weights pushed"))
    torch.manual_seed(0)
    model = apply_lora(tiny_qwen3("dense", tied=False)[0], LoRAConfig(rank=RANK, alpha=16)).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    sync_engine(client, model, model, "adapter")  # the fresh adapter (B = 0): the base itself
    assert max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN)) < TOL
    for step in range(3):
        adapter_step(model, opt, seed=step)
        stale = max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN))
        assert stale > 100 * TOL, f"step {step}: the adapter step changed nothing measurable"
        sync_engine(client, model, model, "adapter")
        error = max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN))
        assert error < TOL, f"after push {step + 2}, the server and transformers differ by {error:.2e}"
    assert served_adapters(client) == [client.served_model]  # the older versions were unloaded
    client.close()


def test_asynchronous_lora_training_pushes_adapter_versions_to_the_server(server, tmp_path):
    """`grpo train ... model.lora=... trainer.max_staleness=1` on the server engine: the generation
    process samples over HTTP and loads the adapter versions its steps need (0, then 1 for step 3);
    the server afterwards samples from the trainer's step-1 adapter, to 1e-4."""
    from peft import PeftModel

    client = VLLMServerClient(server.url, device="cpu")
    loaded = set(served_adapters(client))
    out = train_async_through(server.url, server.model_dir, tmp_path / "run", f"model.lora={{rank: {RANK}, alpha: 16}}",
                              "trainer.lr=0.05")
    version1 = PeftModel.from_pretrained(tiny_qwen3("dense", tied=False)[0], out / "checkpoints" / "step-000001" / "model")
    (adapter,) = set(served_adapters(client)) - loaded  # the one version the run left loaded
    client.close()
    client = VLLMServerClient(server.url, device="cpu", model=adapter)
    rollouts = client.generate(PROMPTS, 2, PLAIN)
    client.close()
    assert max_logprob_error(version1.eval(), rollouts) < TOL
    assert max_logprob_error(server.base, rollouts) > 1e-2  # the adapter is applied, not the base alone
