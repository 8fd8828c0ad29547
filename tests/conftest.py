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


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m grpo ARGS` in a subprocess, the project importable from its checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "grpo", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
