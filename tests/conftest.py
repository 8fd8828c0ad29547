"""Shared test set-up: `gpu` tests skip without CUDA; helpers to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared: use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_vllm():
    """Import vLLM for a test module that runs the real engine.

    `make test` sets GRPO_ZERO_REQUIRE_VLLM=1 where `make setup` installs vLLM (Linux x86_64, and every
    CUDA machine): there a missing or broken vLLM fails the run instead of skipping its tests.
    Elsewhere the module is skipped with the reason.
    """
    if os.environ.get("GRPO_ZERO_REQUIRE_VLLM") == "1":
        import vllm  # noqa: F401  (an ImportError here is the failure we want)

        return vllm
    return pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs it on Linux x86_64)")


@pytest.fixture(scope="session")
def tiny_base():
    """The built-in tiny base (pretrained by our own code, cached per machine), built before any
    timed part of a test starts."""
    from grpo.model.tiny import ensure_tiny_base

    return ensure_tiny_base("tiny-arith-moe", progress=False)


def tiny_qwen3(kind: str = "moe", tied: bool = True, seed: int = 0):
    """(model, tokenizer): a random-init Qwen3 ("dense") or Qwen3-MoE ("moe") sized for vLLM's CPU
    build (head_dim 32, widths multiples of 32) with the local character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                  tie_word_embeddings=tied, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    if kind == "moe":
        config = Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True)
        return Qwen3MoeForCausalLM(config).eval(), tok
    return Qwen3ForCausalLM(Qwen3Config(**common)).eval(), tok


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m grpo ARGS` in a subprocess, the project importable from its checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "grpo", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
