"""Asynchronous RL (`trainer.max_staleness`, grpo/run/async_rollouts.py): the real CLI in subprocesses,
the built-in tiny base, a generation process beside the trainer."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

ROOT = ROOT
SHORT = ["trainer.threads=2", "trainer.prompts_per_step=4", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0"]


def grpo(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def async_run(tmp_path_factory, tiny_base):
    """An uninterrupted 6-step run with max_staleness 1 (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("async") / "k1"
    r = grpo("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=6", "trainer.max_staleness=1",
             "trainer.save_every=2", "trainer.keep_checkpoints=10", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_staleness_zero_is_the_synchronous_loop_bit_for_bit(tmp_path, async_run):
    """max_staleness=0 runs the synchronous step (run_step) and ends on exactly the same weights as a
    recipe without the key; max_staleness=1 trains on other (older) samples, so its weights differ."""
    runs = {}
    for name, extra in {"plain": [], "k0": ["trainer.max_staleness=0"]}.items():
        r = grpo("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=3", *extra, "--output-dir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = final_weights(tmp_path / name)
    assert same(runs["plain"], runs["k0"])
    assert not same(runs["k0"], final_weights(async_run))
    assert not any(k.startswith("async/") for k in metrics(tmp_path / "k0")[0])  # synchronous: no async metrics


def test_every_rollout_records_its_policy_version_and_staleness_is_bounded(async_run):
    rows = metrics(async_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # step s trains on the batch sampled by the weights of step max(0, s - 2): staleness 0, then 1
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert all(r["async/staleness_mean"] == r["async/staleness_max"] for r in rows)
    for key in ("time/generation_wait", "time/update_wait", "train/mismatch_ratio_mean", "train/mismatch_ratio_max"):
        assert all(key in r for r in rows), key
    rollouts = [json.loads(line) for line in (async_run / "rollouts" / "step-000006.jsonl").read_text().splitlines()]
    assert rollouts and {r["policy_version"] for r in rollouts} == {4}
    # the checkpoint after step 2 holds the batch of step 3, sampled by the weights of step 1
    from grpo.run.async_rollouts import IN_FLIGHT_FILE, load_in_flight

    saved = load_in_flight(async_run / "checkpoints" / "step-000002" / IN_FLIGHT_FILE)
    assert [f.step for f in saved] == [3] and {r.policy_version for r in saved[0].batch.rollouts} == {1}
    assert not (async_run / "checkpoints" / "step-000006" / IN_FLIGHT_FILE).exists()  # nothing after the last step


def test_sigkill_at_a_random_moment_then_resume_finishes_with_every_step_once(tmp_path, async_run):
    """SIGKILL (trainer and generation process alike) at a random moment after the first
    checkpoint; `--resume auto` trains on the saved in-flight batch, regenerates the rest, and ends
    on the uninterrupted run's weights."""
    out = tmp_path / "killed"
    args = ["train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=6", "trainer.max_staleness=1",
            "trainer.save_every=2", "trainer.keep_checkpoints=10", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "grpo", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000002" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # somewhere in steps 3-6
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = grpo(*args, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert same(final_weights(out), final_weights(async_run))


def test_a_failure_in_the_generation_process_stops_the_run_within_10_s(tmp_path, tiny_base):
    """A reward plugin that raises (rewards.fail_fast) in the generation process: the trainer exits
    with the generation error (status 4) soon after, and the checkpoints already written load."""
    out, stamp = tmp_path / "run", tmp_path / "failed_at"
    env = {"GRPO_TEST_FAIL_ON_CALL": str(5 * 16), "GRPO_TEST_FAIL_STAMP": str(stamp)}  # the 5th step's batch
    r = grpo("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=40", "trainer.max_staleness=1",
             "trainer.save_every=1", "trainer.keep_checkpoints=10", "rewards.fail_fast=true",
             "rewards.functions=[{name: 'tests.async_plugins:fails_on_call'}]", "--output-dir", str(out), env=env)
    ended = time.time()
    assert r.returncode == 4, r.stderr[-3000:]
    assert "planted failure in the generation process" in r.stderr and "Traceback" not in r.stderr
    assert ended - float(stamp.read_text()) < 10
    from grpo.run.checkpoint import latest, load_state

    ckpt = latest(out)
    assert ckpt is not None and load_state(ckpt).step >= 2
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    torch.load(ckpt / "optimizer.pt", weights_only=False)


def test_refusals_and_fallbacks(tmp_path):
    from grpo.config import RunConfig
    from grpo.run.async_rollouts import effective_staleness, thread_split
    from grpo.run.processes import UnsupportedError, check_supported

    cfg = RunConfig.model_validate({"trainer": {"max_staleness": 2, "threads": 2}})
    with pytest.raises(UnsupportedError, match="max_staleness=2.*2 processes"):
        check_supported(cfg, 2)
    assert effective_staleness(cfg, torch.device("cpu")) == 2
    assert thread_split(cfg.trainer) == (1, 1)
    colocated = RunConfig.model_validate({"trainer": {"max_staleness": 2}, "rollout": {"engine": "vllm"}})
    assert effective_staleness(colocated, torch.device("cpu")) == 0  # shares the device: synchronous
    server = RunConfig.model_validate({"trainer": {"max_staleness": 1},
                                       "rollout": {"engine": "vllm", "vllm": {"mode": "server"}}})
    assert effective_staleness(server, torch.device("cuda")) == 1


def test_off_policy_batches_are_always_weighted_by_the_behaviour_ratio():
    """The decoupled objective: with max_staleness >= 1 and sampler_correction none, tokens are
    weighted by min(pi_old / mu, C) (TIS); on-policy runs keep the recipe's choice."""
    from grpo.algo.loss import objective_from_config
    from grpo.config import AlgorithmConfig

    algo = AlgorithmConfig()
    assert algo.sampler_correction == "none"
    lp = torch.zeros(1, 3, requires_grad=True)
    mu = torch.log(torch.tensor([[0.5, 1.0, 4.0]]))  # pi_old / mu = exp(0 - log mu) = [2, 1, 0.25]
    adv, mask = torch.ones(1), torch.ones(1, 3)
    on, _ = objective_from_config(algo)
    off, _ = objective_from_config(algo, off_policy=True)
    loss_on, _ = on(lp, lp.detach(), adv, mask, normalizer=3.0, sampler_logprobs=mu)
    loss_off, _ = off(lp, lp.detach(), adv, mask, normalizer=3.0, sampler_logprobs=mu)
    assert loss_on.item() == pytest.approx(-1.0)  # -(1 + 1 + 1) / 3
    assert loss_off.item() == pytest.approx(-(2.0 + 1.0 + 0.25) / 3)  # weights min([2, 1, 0.25], C=2)


def test_length_schedule_follows_the_step_a_batch_is_sampled_for(tmp_path, tiny_base):
    """rollout.max_new_tokens_schedule under max_staleness 1: the batch of step 2 is sampled while
    step 1 trains, with step 2's cap (12), not the cap of the step the trainer is on (6)."""
    run = tmp_path / "run"
    r = grpo("train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=3", "trainer.max_staleness=1",
             "rollout.max_new_tokens_schedule=[[0, 6], [2, 12]]", "--output-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(run)
    assert [m["rollout/max_new_tokens"] for m in rows] == [6.0, 12.0, 12.0]
    assert rows[0]["rollout/response_length_max"] == 6  # the cap binds at 6 ...
    assert max(m["rollout/response_length_max"] for m in rows[1:]) > 6  # ... and was raised for the batches ahead
    assert rows[1]["async/staleness_max"] == 1.0  # step 2's batch was sampled ahead, by the weights of step 0


def test_the_trainer_sends_each_engine_its_own_private_copy_of_the_policy():
    """`weights_message`: full weights for the transformers engine; a LoRA run's adapter only (the
    generation process holds the same base); for a vLLM server, the adapter in PEFT's format, or the
    merged weights with `sync: merged`. Every tensor is a copy the trainer's next update leaves alone."""
    from grpo.config import LoRAConfig, RunConfig
    from grpo.model.lora import apply_lora
    from grpo.run.async_rollouts import weights_message
    from tests.conftest import tiny_qwen3
    from tests.grpo.model.test_lora import randomize_adapters

    def cfg(engine: str, lora: dict | None) -> RunConfig:
        return RunConfig.model_validate({"rollout": {"engine": engine}, "model": {"lora": lora}})

    full = tiny_qwen3("dense")[0]
    peft = apply_lora(tiny_qwen3("dense")[0], LoRAConfig(rank=4, alpha=8))
    randomize_adapters(peft)
    sent = {engine_sync: weights_message(cfg(engine_sync[0], {"rank": 4, "alpha": 8, "sync": engine_sync[1]}), peft)
            for engine_sync in (("hf", "adapter"), ("vllm", "adapter"), ("vllm", "merged"))}
    sent["hf", None] = weights_message(cfg("hf", None), full)
    kind, tensors, config = sent["hf", None]
    assert kind == "state" and config is None and tensors.keys() == full.state_dict().keys()
    kind, tensors, _ = sent["hf", "adapter"]
    assert kind == "state" and tensors and all("lora_" in k for k in tensors)
    kind, tensors, config = sent["vllm", "adapter"]
    assert kind == "adapter" and config["r"] == 4 and all(".default." not in k for k in tensors)  # PEFT's file names
    kind, tensors, _ = sent["vllm", "merged"]
    assert kind == "state" and not any("lora_" in k for k in tensors) and "model.layers.0.self_attn.q_proj.weight" in tensors
    before = {key: {k: v.clone() for k, v in message[1].items()} for key, message in sent.items()}
    with torch.no_grad():
        for p in [*full.parameters(), *peft.parameters()]:
            p.add_(1.0)
    for key, message in sent.items():
        assert all(torch.equal(v, before[key][k]) for k, v in message[1].items()), key
