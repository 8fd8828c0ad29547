"""Several processes on this CPU: 1 vs 2 processes (DDP and FSDP2, gloo), two machines on
loopback, launcher configs. Everything runs the real CLI in subprocesses on the tiny-cpu recipe
(the tiny MoE base, cached), shortened to a few steps of 4 prompts x 4 completions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli

# micro_batch_size=8: one rank's share (2 prompts x 4) is one micro-batch, and the 1-process run
# splits the same 16 rows into the same two micro-batches. With a single 16-row micro-batch in one
# process the float sums associate differently and Adam amplified that to 1.3e-5 on a router
# weight after 2 steps; with matching micro-batches the weights came out bit-identical here.
# shared_prompt_forward=false: a DDP/FSDP-wrapped model runs one forward per row unless packed, and the
# shared-prompt forward of one process sums a prompt's gradients in another order (equal to float
# rounding, tests/grpo/algo/test_shared_prompts.py), so the 1-process reference runs the same layout.
SHORT = ["trainer.threads=1", "trainer.prompts_per_step=4", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0", "trainer.save_every=1", "trainer.keep_checkpoints=100",
         "trainer.micro_batch_size=8", "trainer.shared_prompt_forward=false"]



def step_weights(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    # FSDP2's full state dict also names the tied lm_head.weight; every other key is shared
    assert a.keys() - {"lm_head.weight"} == b.keys() - {"lm_head.weight"}
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("one") / "run"
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", *SHORT, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_match_one_process(tmp_path, one_process):
    """Same global batch (4 prompts: 2 per rank): after every step the ranks hold bit-identical
    weights (sha256 of every parameter) and the weights equal the 1-process run's to 1e-5."""
    out = tmp_path / "run"
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", *SHORT, "--output-dir", str(out),
                     "--accelerate-config", "cpu-2proc")
    assert result.returncode == 0, result.stderr[-3000:]
    moved = False
    for step in range(1, 5):
        state = json.loads((out / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        assert state["world_size"] == 2
        digests = state["parameter_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], f"step {step}: ranks differ"
        diff = max_diff(step_weights(out, step), step_weights(one_process, step))
        print(f"step {step}: max |w_2proc - w_1proc| = {diff:.3g}")
        assert diff < 1e-5, f"step {step}: {diff}"
        moved |= max_diff(step_weights(out, step), step_weights(one_process, 1) if step > 1 else step_weights(out, 1)) > 0
    assert moved, "the weights never changed: the comparison would be vacuous"
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):  # global metrics (all-reduced) agree too
        assert a["reward/mean"] == pytest.approx(b["reward/mean"]) and a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
    # 5. the final model of a 2-process run loads with transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == "qwen3_moe"


def test_fsdp2_on_cpu_matches_one_process(tmp_path, one_process):
    """FSDP2 (torch fully_shard over gloo; accelerate itself falls back to DDP on CPU) gives the
    1-process weights to 2e-5 after every step."""
    out = tmp_path / "run"
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", *SHORT, "--output-dir", str(out),
                     "--accelerate-config", "cpu-fsdp2")
    assert result.returncode == 0, result.stderr[-3000:]
    for step in range(1, 5):
        diff = max_diff(step_weights(out, step), step_weights(one_process, step))
        print(f"step {step}: max |w_fsdp2 - w_1proc| = {diff:.3g}")
        # after the merge with main's chunked log-probs, step 3 measured 1.03e-5 on one router weight
        # (layers.2.mlp.gate; every other parameter <= 5e-7, losses equal): reduce-scatter summation
        # order, amplified by Adam where the gradient is near eps (see the module comment above)
        assert diff < 2e-5
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["parameter_digests"] == [None, None]  # sharded: no replicated parameters to compare


LORA = ["model.lora={rank: 8, alpha: 16}", "trainer.lr=2e-3"]


def adapter_at(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model" / "adapter_model.safetensors")


def test_lora_under_ddp_and_fsdp2_matches_one_process_and_resumes_exactly(tmp_path, tiny_base):
    """A LoRA run (adapters on attention, 4 steps) in one process, under DDP and under FSDP2 (2
    processes): every rank draws the same fresh adapter, so the adapters agree after every step (DDP
    bit for bit, FSDP2 to its reduce-scatter rounding). An FSDP2 run killed after step 2 and resumed
    ends with the uninterrupted run's adapter, bit for bit."""
    runs = {}
    for layout in (None, "cpu-2proc", "cpu-fsdp2"):
        out = runs[layout] = tmp_path / (layout or "one")
        extra = ["--accelerate-config", layout] if layout else []
        result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", *SHORT, *LORA, "--output-dir", str(out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    one = runs[None]
    assert max_diff(adapter_at(one, 4), adapter_at(one, 1)) > 1e-3, "the adapter never moved: the comparison is vacuous"
    for step in range(1, 5):
        assert max_diff(adapter_at(runs["cpu-2proc"], step), adapter_at(one, step)) == 0, f"DDP, step {step}"
        diff = max_diff(adapter_at(runs["cpu-fsdp2"], step), adapter_at(one, step))
        print(f"step {step}: max |A_fsdp2 - A_1proc| = {diff:.3g}")
        assert diff < 2e-5, f"FSDP2, step {step}: {diff}"
    killed = tmp_path / "killed"  # the FSDP2 run as a kill after step 2's checkpoint leaves it
    shutil.copytree(runs["cpu-fsdp2"], killed)
    for name in ("checkpoints/step-000003", "checkpoints/step-000004", "final", "summary.json"):
        shutil.rmtree(killed / name) if (killed / name).is_dir() else (killed / name).unlink()
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=4", *SHORT, *LORA, "--output-dir", str(killed),
                     "--accelerate-config", "cpu-fsdp2", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    final = [load_file(run / "final" / "adapter_model.safetensors") for run in (runs["cpu-fsdp2"], killed)]
    assert max_diff(*final) == 0


def test_two_machines_on_loopback(tmp_path, tiny_base):
    """--num_machines 2, machine ranks 0 and 1 on 127.0.0.1, one process each: 3 steps."""
    from grpo.run.launch import free_port

    out = tmp_path / "run"
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = [x for x in SHORT if not x.startswith("trainer.save_every")] + ["trainer.save_every=0"]
    procs = [subprocess.Popen([sys.executable, "-m", "grpo", "train", "recipes/tiny-cpu.yaml", "trainer.steps=3", *steps,
                               "--output-dir", str(out), "--accelerate-config", "multi-node-cpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["train"]["processes"] == 2


def test_every_launcher_config_makes_a_launch_command():
    """Each recipes/accelerate file parses, and `--accelerate-config NAME` builds the
    `accelerate launch` command for it, with machine overrides applied."""
    from grpo.config import ACCELERATE_DIR, resolve_accelerate_config
    from grpo.run.launch import launch_command

    names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    assert {"cpu-2proc", "single-gpu", "ddp", "fsdp2", "zero3", "multi-node-cpu", "multi-node-fsdp2"} <= set(names)
    for name in names:
        path = resolve_accelerate_config(name)
        conf = yaml.safe_load(path.read_text())
        assert conf["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}, name
        if conf["distributed_type"] == "FSDP":
            assert conf["fsdp_config"]["fsdp_version"] == 2, name
        cmd = launch_command(path, ["recipes/tiny-cpu.yaml"], num_machines=4, machine_rank=3, main_process_ip="10.1.2.3")
        assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
        assert cmd[cmd.index("--machine_rank") + 1] == "3" and cmd[cmd.index("--main_process_ip") + 1] == "10.1.2.3"
        per = conf["num_processes"] // conf["num_machines"]
        assert cmd[cmd.index("--num_processes") + 1] == str(per * 4)
        assert cmd[-3:] == ["grpo", "train", "recipes/tiny-cpu.yaml"]
    with pytest.raises(FileNotFoundError, match="cpu-2proc"):
        resolve_accelerate_config("no-such-config")


def test_accelerate_launch_module_entry(tmp_path, tiny_base):
    """`accelerate launch -m grpo train RECIPE` works directly (2 CPU processes)."""
    out = tmp_path / "run"
    from grpo.run.launch import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu-2proc.yaml",
           "--main_process_port", str(free_port()), "-m", "grpo", "train", "recipes/tiny-cpu.yaml", "trainer.steps=1",
           *SHORT, "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["train"]["processes"] == 2


def test_dynamic_sampling_is_refused_under_several_processes():
    """Dynamic sampling with world size > 1 is a documented unsupported combination: it fails at
    start-up with a message naming the setting; one process, or dynamic sampling off, is fine."""
    from grpo.collectives import group_seed
    from grpo.config import RunConfig
    from grpo.run.processes import UnsupportedError, check_supported

    dapo = RunConfig.model_validate({"algorithm": {"dynamic_sampling": True}})
    check_supported(dapo, 1)
    check_supported(RunConfig(), 2)
    with pytest.raises(UnsupportedError, match="algorithm.dynamic_sampling"):
        check_supported(dapo, 2)
    # round 0 keeps the plain per-group seed; extra dynamic-sampling rounds get other seeds
    assert group_seed(3, 5, 7, 0) == group_seed(3, 5, 7) != group_seed(3, 5, 7, 1)
