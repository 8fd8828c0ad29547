"""CPU memory estimate (grpo/commands/cpu_memory.py): its arithmetic by hand, the `grpo train`
start-up check that stops a model too large for the RAM before any weights load, and the
`grpo plan --gpu cpu` report."""

from __future__ import annotations

import json
import time

import pytest
import torch

import grpo.commands.cpu_memory as cm
from grpo.cli import main
from grpo.commands.plan import arch_from_config
from grpo.config import load_recipe
from tests.conftest import ROOT

RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
SMALL = {"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 32, "tie_word_embeddings": False}
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
             "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the start-up check runs on CPU-only machines")


def config_dir(tmp_path, name: str, config: dict):
    """A model directory holding only config.json: no weights, no tokenizer (loading it would fail)."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def machine_24gib(monkeypatch):
    monkeypatch.delenv(cm.SKIP_ENV, raising=False)
    monkeypatch.setattr(cm, "machine_memory", lambda: cm.MachineMemory(24.0, 20.0, "test"))


def test_estimate_arithmetic_by_hand():
    cfg = load_recipe(RECIPE, ["algorithm.beta=0.04", "trainer.prompts_per_step=2", "rollout.group_size=4",
                               "trainer.micro_batch_size=4", "data.max_prompt_tokens=10", "rollout.max_new_tokens=6",
                               "algorithm.logprob_chunk=4", "rewards.workers=0"])
    arch = arch_from_config("small", SMALL)
    est = cm.estimate_cpu_memory(cfg, arch)
    # parameters: lm_head 100*16 + embedding 100*16 + 2 layers * (attention 16*16*2 + 2*16*2*4 = 768,
    # MLP 3*16*32 = 1536) = 1600 + 1600 + 4608 = 7808
    assert est.params == 7808
    gib = cm.GIB
    b = 4  # float32
    assert est.resident["policy weights (float32)"] * gib == 7808 * b  # 31,232 bytes
    assert est.resident["AdamW moments (2 x float32)"] * gib == 2 * 7808 * b  # 62,464
    assert est.resident["reference copy (algorithm.beta 0.04)"] * gib == 7808 * b  # beta > 0: a frozen copy
    assert est.training["gradients (float32)"] * gib == 7808 * b
    # micro-batch: min(4, 2 prompts x 4) = 4 sequences of one prompt (group of 4), shared: 10 prompt tokens
    # once + 4 x 6 completion tokens = 34 tokens; 2 layers; per token and layer HIDDEN_ACTS x 16 + FFN_ACTS x 32
    # elements of 4 bytes (12*16 + 4*32 = 320 -> 34 * 2 * 320 * 4 = 87,040 bytes)
    acts = 34 * 2 * (cm.HIDDEN_ACTS * 16 + cm.FFN_ACTS * 32) * b
    assert est.training["activations (4 seq, prompts shared: 34 tokens)"] * gib == acts
    # logits at completion positions only, 4 at a time: LOGITS_COPIES float32 [4 seq, 4, 100] (4 copies: 25,600)
    logits = cm.LOGITS_COPIES * 4 * 4 * 100 * 4
    assert est.training["logits (float32, 4 seq x 4-token chunk x 100 vocab, x4)"] * gib == logits
    # rollout: 8 sequences x 16 tokens x (2 layers x K and V x 2 kv heads x 4 dims x 4 bytes = 128) = 16,384
    assert est.rollout["KV cache (8 seq x 16 tokens, transformers engine)"] * gib == 8 * 16 * 128
    # peak of one process: resident + the update (larger than the rollout here)
    resident = 4 * 7808 * b + cm.PROCESS_GIB * gib
    assert est.per_process_gib * gib == pytest.approx(resident + 7808 * b + acts + logits)
    assert est.total_gib == est.per_process_gib  # no reward workers, one process
    # one micro-batch (8 >= 8 sequences): backward frees activations as gradients fill, so the update peaks
    # at the larger of the gradients and activations + logits + the head's gradient (100 x 16 x 4 = 6,400)
    one = cm.estimate_cpu_memory(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"micro_batch_size": 8})}), arch)
    rest = sum(one.training.values()) - one.training["gradients (float32)"]
    assert one.update_gib * gib == pytest.approx(max(7808 * b, rest * gib + 100 * 16 * b))
    # without shared prompts: every row whole, 4 x 16 = 64 tokens, logits over all 16 positions
    plain = cm.estimate_cpu_memory(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"shared_prompt_forward": False})}), arch)
    assert plain.training["activations (4 seq x 16 tokens)"] * gib == 64 * 2 * (cm.HIDDEN_ACTS * 16 + cm.FFN_ACTS * 32) * b
    # two processes (DDP/FSDP wrappers): prompts shared in packed micro-batches only
    two = cm.estimate_cpu_memory(cfg, arch, processes=2)
    assert two.training["activations (4 seq, prompts shared: 34 tokens)"] * gib == acts
    padded = cm.estimate_cpu_memory(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"max_tokens_per_micro_batch": None})}), arch, processes=2)
    assert "activations (4 seq x 16 tokens)" in padded.training


def test_vllm_two_processes_and_reward_workers_add_up():
    cfg = load_recipe(RECIPE, ["rollout.engine=vllm", "rollout.vllm.kv_cache_memory_mb=512", "model.dtype=bfloat16",
                               "rewards.workers=3"])
    arch = arch_from_config("small", SMALL)
    one, two = cm.estimate_cpu_memory(cfg, arch), cm.estimate_cpu_memory(cfg, arch, processes=2)
    parts = one.resident
    assert parts["vLLM KV cache (512 MiB)"] == 0.5
    assert parts[f"vLLM weights (bfloat16, x{cm.VLLM_WEIGHT_COPIES:g} with its repacked copy)"] * cm.GIB == (
        cm.VLLM_WEIGHT_COPIES * 7808 * 2)
    assert one.rollout == {}  # vLLM holds its own KV cache; the policy does not decode
    assert one.other == {"reward workers (3)": 3 * cm.REWARD_WORKER_GIB}
    assert two.total_gib == pytest.approx(2 * two.per_process_gib + 3 * cm.REWARD_WORKER_GIB)


@cpu_only
def test_train_stops_before_loading_a_model_too_large_for_the_ram(tmp_path, capsys, machine_24gib):
    model = config_dir(tmp_path, "llama-70b-config-only", LLAMA_70B)
    out = tmp_path / "run"
    t = time.monotonic()
    code = main(["train", RECIPE, f"model.name_or_path={model}", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "GiB of memory" in lines[0] and "24.0 GiB" in lines[0] and "model.dtype=bfloat16" in lines[0], err
    assert "a smaller model" in lines[0] and "Traceback" not in err
    assert not out.exists()  # stopped before the run directory, the rewards or any weights
    assert time.monotonic() - t < 10


@cpu_only
def test_more_than_available_warns_and_the_check_can_be_skipped(tmp_path, monkeypatch):
    model = config_dir(tmp_path, "small", SMALL)
    cfg = load_recipe(RECIPE, [f"model.name_or_path={model}"])
    monkeypatch.delenv(cm.SKIP_ENV, raising=False)
    monkeypatch.setattr(cm, "machine_memory", lambda: cm.MachineMemory(64.0, 0.01, "test"))
    said = []
    assert cm.check_cpu_memory(cfg, "r.yaml", warn=said.append) is not None
    assert len(said) == 1 and "more than the 0.0 GiB available now" in said[0], said
    monkeypatch.setenv(cm.SKIP_ENV, "1")
    assert cm.check_cpu_memory(cfg, "r.yaml", warn=said.append) is None and len(said) == 1
    monkeypatch.delenv(cm.SKIP_ENV)
    # nothing to check, and nothing said: a built-in tiny base, a Hub id not cached here
    for name in ("builtin:tiny-arith-moe", "grpo-zero-tests/not-cached-anywhere"):
        assert cm.check_cpu_memory(load_recipe(RECIPE, [f"model.name_or_path={name}"]), "r.yaml", warn=said.append) is None
    assert len(said) == 1


def test_plan_cpu_report_prints_its_rows(tmp_path, capsys, machine_24gib):
    small = config_dir(tmp_path, "small", SMALL)
    assert main(["plan", RECIPE, f"model.name_or_path={small}", "rollout.engine=vllm", "--gpu", "cpu", "--plain"]) == 0
    out = capsys.readouterr().out
    for row in ("model ", "machine ", "resident: policy weights (float32)", "resident: AdamW moments",
                "resident: vLLM KV cache (256 MiB)", "update: gradients", "update: activations", "update: logits",
                "per training process", "other: reward workers (2)", "total (estimate)", "fits "):
        assert row in out, (row, out)
    assert "24.0 GiB total" in out
    big = config_dir(tmp_path, "big", LLAMA_70B)
    assert main(["plan", RECIPE, f"model.name_or_path={big}", "--gpu", "cpu", "--plain"]) == 1
    captured = capsys.readouterr()
    assert "does not fit" in captured.out and "model.dtype=bfloat16" in captured.out
    assert "does not fit in this machine's 24.0 GiB" in captured.err
