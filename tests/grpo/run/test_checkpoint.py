"""Checkpoints and resume (the real CLI on the tiny-cpu recipe, a few short steps), failed
checkpoint writes, and non-finite steps.
"""

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

from tests.conftest import ROOT, run_cli

SHORT = ["trainer.threads=1", "trainer.prompts_per_step=4", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0"]



def final_weights(run: Path) -> dict:
    """The final model's tensors: the whole model, or a LoRA run's adapter (PEFT's file)."""
    from safetensors.torch import load_file

    adapter = run / "final" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else run / "final" / "model.safetensors")


def kill_and_resume(tmp_path: Path, args: list[str], first_checkpoint: str = "step-*") -> Path:
    """Start `grpo ARGS --resume auto`, SIGKILL it (its whole process group: the trainer and an
    asynchronous run's generation process alike) at a random moment once `first_checkpoint` is
    complete (and before the run ends), then resume it to the end; returns its run directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The kill must land between the first checkpoint and the end of the run: each attempt starts
    # afresh with a shorter random delay, the last one kills as soon as a checkpoint exists.
    for attempt, longest_delay in enumerate((1.0, 0.3, 0.0)):
        run = tmp_path / f"killed-{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "grpo", *args, "--output-dir", str(run), "--resume", "auto"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 300
        while not any(run.glob(f"checkpoints/{first_checkpoint}/state.json")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, longest_delay))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not (run / "final").exists():
            break
    else:
        pytest.fail("every run finished before the kill landed")
    killed_at = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    print("checkpoints when killed:", killed_at)

    result = run_cli(*args, "--output-dir", str(run), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    return run


def assert_same_final_weights(a_run: Path, b_run: Path) -> None:
    a, b = final_weights(a_run), final_weights(b_run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_base):
    """SIGKILL at a random moment after the first checkpoint, `--resume auto`, same final bits."""
    args = ["train", "recipes/tiny-cpu.yaml", "trainer.steps=10", "trainer.save_every=2", *SHORT]
    reference = tmp_path / "uninterrupted"
    result = run_cli(*args, "--output-dir", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    run = kill_and_resume(tmp_path, args)
    assert_same_final_weights(reference, run)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the rows the killed run logged after its checkpoint were dropped


# LoRA: adapters on the frozen base, the KL term against the base (the same module, adapters off)
LORA = ["model.lora={rank: 8, alpha: 16}", "algorithm.beta=0.04"]


def test_sigkill_then_resume_a_lora_run_is_bit_identical(tmp_path):
    """The same for a LoRA run: its checkpoints hold the adapter (PEFT's format) and the adapter's
    optimizer state; the final adapter is bit-identical. On the toy model (random init, nothing
    pretrained), rewarded by completion length so that every group's rewards differ and the
    adapter moves from its start (B = 0) from the first step."""
    args = ["train", "recipes/tiny-cpu.yaml", "--toy", "trainer.steps=10", "trainer.save_every=2", *SHORT, *LORA,
            'rewards.functions=[{name: "tests.rewards_plugins:async_len"}]', "trainer.lr=0.01"]
    reference = tmp_path / "uninterrupted"
    result = run_cli(*args, "--output-dir", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    run = kill_and_resume(tmp_path, args)
    assert_same_final_weights(reference, run)
    assert (run / "final" / "adapter_config.json").is_file() and not (run / "final" / "model.safetensors").exists()
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "model" / "adapter_model.safetensors").is_file()
    assert sum(bool(v.abs().max() > 0) for k, v in final_weights(run).items() if "lora_B" in k) >= 6
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[0]["train/kl"] == 0 and rows[-1]["train/kl"] > 0  # the policy left its reference, the base


def test_sigkill_then_resume_with_mini_batches_reference_refresh_and_length_schedule(tmp_path, tiny_base):
    """The DeepSeek-R1 recipe features together: 2 optimizer steps per generation batch, the
    reference replaced by the policy every 3 steps (KL on), the completion cap raised from 8 to
    20 tokens at step 5. Killed once the step-4 checkpoint exists (the reference is then the
    policy of step 3, neither the recipe's model nor the checkpoint's policy; the cap changes after
    the resume), resumed: the same final bits and the same metrics as the uninterrupted run."""
    args = ["train", "recipes/tiny-cpu.yaml", "trainer.steps=6", "trainer.save_every=2", *SHORT,
            "algorithm.beta=0.04", "algorithm.ref_refresh_steps=3", "algorithm.mini_batches=2",
            "rollout.max_new_tokens_schedule=[[0, 8], [5, 20]]"]
    reference = tmp_path / "uninterrupted"
    result = run_cli(*args, "--output-dir", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    # the length schedule: cap 8 for steps 1-4, 20 from step 5 (where the model writes more than 8)
    assert [r["rollout/max_new_tokens"] for r in rows] == [8.0] * 4 + [20.0] * 2
    assert all(r["rollout/response_length_max"] <= r["rollout/max_new_tokens"] for r in rows)
    assert max(r["rollout/response_length_max"] for r in rows[4:]) > 8
    assert [r["train/ref_refreshed"] for r in rows] == [0, 0, 1, 0, 0, 1]
    # the policy moves away from its reference once a step had a reward signal (a group whose rewards all
    # agree has no advantage, and the first steps of the tiny base can be all zero)
    assert any(r["train/kl"] > 1e-6 for r in rows[1:]), [r["train/kl"] for r in rows]

    run = kill_and_resume(tmp_path, args, first_checkpoint="step-000004")
    assert_same_final_weights(reference, run)
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("train/kl", "train/loss", "rollout/max_new_tokens", "train/lr"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], key


# The tiny tool recipe at toy scale (a random-init model of its base's shape, nothing to pretrain) with an
# environment in which every policy token is a tool call run in the real sandbox, so every rollout has
# environment turns; rewarded by completion length (tool output included), so each group's rewards differ.
TOOL = ["train", "recipes/tiny-tool-cpu.yaml", "--toy", "trainer.steps=6", "trainer.save_every=2",
        "trainer.keep_checkpoints=10", *SHORT, "rollout.tools.environment=tests.env_plugins:every_token_python",
        'rewards.functions=[{name: "tests.rewards_plugins:async_len"}]', "trainer.lr=0.01"]


@pytest.mark.parametrize("staleness", [0, 1])
def test_sigkill_then_resume_with_a_tool_environment_is_bit_identical(tmp_path, staleness):
    """Multi-turn rollouts with the python sandbox, synchronous (k=0) and asynchronous (k=1): SIGKILL
    at a random moment after the first checkpoint, `--resume auto`, the uninterrupted run's final bits
    and every step logged once."""
    args = [*TOOL, f"trainer.max_staleness={staleness}"]
    reference = tmp_path / "uninterrupted"
    result = run_cli(*args, "--output-dir", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/tool_calls_mean"] > 0 for r in rows)  # the rollouts did call the tool
    assert all(r["train/grad_norm"] > 0 for r in rows)  # and every step moved the weights
    run = kill_and_resume(tmp_path, args)
    assert_same_final_weights(reference, run)
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in rows]


def test_output_dir_refusal_allows_resume(tmp_path, tiny_base):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=1", *SHORT, "--output-dir", str(out))
    assert result.returncode == 2 and "not empty" in result.stderr
    result = run_cli("train", "recipes/tiny-cpu.yaml", "--resume", "auto")
    assert result.returncode == 2 and "--resume auto needs --output-dir" in result.stderr


def _tiny_model_and_friends():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, tok, opt, sched


def test_checkpoint_write_failing_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    """The second save dies after the model files are written (an OSError, as from a read-only or
    full disk; chmod cannot make a directory read-only for root, so the error is injected). The
    first checkpoint stays the latest and loads; no partial directory is left behind."""
    from transformers import AutoModelForCausalLM

    from grpo.run import checkpoint

    model, tok, opt, sched = _tiny_model_and_friends()
    first = checkpoint.save(tmp_path, checkpoint.TrainState(step=1, sampler_position=4), model=model, unwrapped=model,
                            tokenizer=tok, optimizer=opt, scheduler=sched, keep_last=2, is_main=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise OSError(30, "Read-only file system")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="Read-only"):
        checkpoint.save(tmp_path, checkpoint.TrainState(step=2), model=model, unwrapped=model, tokenizer=tok,
                        optimizer=opt, scheduler=sched, keep_last=2, is_main=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert checkpoint.load_state(first).sampler_position == 4
    AutoModelForCausalLM.from_pretrained(first / "model")
    fresh_model, _, fresh_opt, fresh_sched = _tiny_model_and_friends()
    checkpoint.restore(first, model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched, rank=0)

    # a write killed mid-way (SIGKILL) leaves a hidden temporary directory: ignored
    partial = tmp_path / "checkpoints" / ".tmp-step-000003-abc"
    (partial / "model").mkdir(parents=True)
    assert checkpoint.latest(tmp_path) == first


def test_keeps_only_the_last_n(tmp_path):
    from grpo.run import checkpoint

    model, tok, opt, sched = _tiny_model_and_friends()
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, checkpoint.TrainState(step=step), model=model, unwrapped=model, tokenizer=tok,
                        optimizer=opt, scheduler=sched, keep_last=2, is_main=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


# --- non-finite steps ---------------------------------------------------------------------------

NAN_DRIVER = """
import sys
import grpo.run.sampling as t
from dataclasses import replace
real = t.score_rollouts
calls = {"n": 0}
bad_steps = {int(s) for s in sys.argv[1].split(",")}
def nan_scores(*args, **kwargs):  # injected fault: the rewards (hence advantages and loss) of some steps are NaN
    calls["n"] += 1
    rollouts, metrics = real(*args, **kwargs)
    if calls["n"] in bad_steps:
        rollouts = [replace(r, reward=float("nan")) for r in rollouts]
    return rollouts, metrics
t.score_rollouts = nan_scores
from grpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_with_nan(bad_steps: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NAN_DRIVER, bad_steps, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = run_with_nan("2", "train", "recipes/tiny-cpu.yaml", "trainer.steps=3", "trainer.save_every=1",
                          "trainer.keep_checkpoints=5", *SHORT, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1]
    from safetensors.torch import load_file

    w1 = load_file(out / "checkpoints/step-000001/model/model.safetensors")
    w2 = load_file(out / "checkpoints/step-000002/model/model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step left the weights alone
    assert all(torch.isfinite(v).all() for v in w2.values())


def test_k_consecutive_non_finite_steps_stop_the_run(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = run_with_nan("2,3,4,5,6", "train", "recipes/tiny-cpu.yaml", "trainer.steps=8",
                          "trainer.max_consecutive_skips=2", *SHORT, "--output-dir", str(out))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "2 consecutive steps had a non-finite loss or gradient norm" in result.stderr
    assert "trainer.max_consecutive_skips=2" in result.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/skipped_steps"] == 2
    assert not (out / "final").exists()
