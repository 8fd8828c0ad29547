"""The vLLM engine's server mode for real (`rollout.vllm.server.VLLMServerClient`).

A real vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`, our worker extension)
runs as a subprocess on 127.0.0.1 for the whole module, serving a tiny Qwen3-MoE (head_dim 32,
expert width 32: sizes vLLM's CPU kernels take) with a character tokenizer built locally, in
float32. On the CPU the client pushes weights through files; the NCCL channel is checked by the
`gpu` test at the end (two GPUs).

The central check: the logprobs the server reports for the tokens it sampled match a teacher-forced
transformers forward of the trainer's current weights to 1e-4 (temperature 1), at start-up, after
a push of a real optimizer step's weights, and after planted failed pushes (which must be errors
within seconds, leaving the last good weights in use).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo.run.launch import free_port
from rollout.base import SamplingParams
from rollout.vllm.server import VLLMServerClient, VLLMServerError, completion_bodies
from tests.conftest import ROOT, require_vllm, tiny_qwen3

require_vllm()
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
SEEDS = (101, 202)
PLAIN = SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_seeds=SEEDS)
STARTUP_S = 240  # about 35-50 s on a shared 2-core machine


def build_model(seed: int = 0):
    return tiny_qwen3("moe", tied=False, seed=seed)


def optimizer_step(model, seed: int) -> None:
    """One AdamW step on a language-modelling loss (every parameter moves by about lr)."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))  # [B, T]
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def max_logprob_error(model, rollouts) -> float:
    """Largest |sampler logprob - teacher-forced transformers logprob| over all sampled tokens."""
    worst = 0.0
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])  # [1, T]
        with torch.no_grad():
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float()  # [C, V]
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]  # [C]
        worst = max(worst, (expected - torch.tensor(r.logprobs)).abs().max().item())
    return worst


def wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the vLLM server did not answer /health within {timeout:g} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine and worker processes), SIGKILL after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def start_server(model_dir: Path, log: Path, extra_env: dict | None = None, extra_args: tuple = ()):
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **(extra_env or {})}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
        "--kv-cache-memory-bytes", str(32 << 20), "--enforce-eager", "--seed", "0",
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", "rollout.vllm.worker.WeightSyncExtension", *extra_args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-server")
    model, tok = build_model()
    model.save_pretrained(root / "tiny-moe")
    tok.save_pretrained(root / "tiny-moe")
    proc, url = start_server(root / "tiny-moe", root / "server.log")
    try:
        wait_for_health(url, proc, root / "server.log", STARTUP_S)
        # `current`: the weights the server must be sampling from (the last good push)
        yield SimpleNamespace(url=url, current=model, log=root / "server.log", model_dir=root / "tiny-moe")
    finally:
        stop_server(proc)


def test_generate_matches_the_served_checkpoint_and_is_seeded_per_prompt(server):
    client = VLLMServerClient(server.url, device="cpu")
    assert client.channel == "file"
    rollouts = client.generate(PROMPTS, 2, PLAIN)
    assert [r.group for r in rollouts] == [0, 0, 1, 1]
    assert [r.prompt_ids for r in rollouts] == [tuple(PROMPTS[0])] * 2 + [tuple(PROMPTS[1])] * 2
    assert all(len(r.completion_ids) == 8 == len(r.logprobs) and r.finish_reason == "length" for r in rollouts)
    assert max_logprob_error(server.current, rollouts) < TOL
    # a prompt's completions depend on its own seed only, not on the batch it came in
    alone = client.generate(PROMPTS[1:], 2, SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_seeds=SEEDS[1:]))
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in rollouts[2:]]
    assert rollouts[0].completion_ids != rollouts[1].completion_ids  # seed + j per completion
    client.close()


def test_a_pushed_optimizer_step_is_what_the_server_samples_from(server):
    client = VLLMServerClient(server.url, device="cpu")
    before = copy.deepcopy(server.current)
    model = copy.deepcopy(server.current)
    optimizer_step(model, seed=1)
    client.update_weights(model.state_dict().items())
    server.current = model
    rollouts = client.generate(PROMPTS, 2, PLAIN)
    assert max_logprob_error(model, rollouts) < TOL
    assert max_logprob_error(before, rollouts) > 1e-2  # the push changed what the server computes
    client.close()


def _without(state: dict, name: str) -> dict:
    assert name in state
    return {k: v for k, v in state.items() if k != name}


@pytest.mark.parametrize("planted", ["wrong shape", "missing tensor", "missing tensor, unchecked"])
def test_a_failed_push_is_an_error_within_seconds_and_the_last_good_weights_stay(server, planted):
    """'unchecked' skips the workers' check, so the load itself fails after changing most of the
    model: the workers must then reload the last good weights."""
    client = VLLMServerClient(server.url, device="cpu")
    newer = copy.deepcopy(server.current)
    optimizer_step(newer, seed=2)  # what a half load would leave behind: clearly not the last good weights
    state = newer.state_dict()
    check = True
    if planted == "wrong shape":
        name = "model.layers.0.self_attn.q_proj.weight"
        state = {**state, name: torch.zeros(state[name].shape[0] + 1, state[name].shape[1])}
        match = "wrong shape: model.layers.0.self_attn.q_proj.weight"
    elif planted == "missing tensor":
        state, match = _without(state, "model.layers.1.post_attention_layernorm.weight"), "1 missing"
    else:
        state, check, match = _without(state, "model.norm.weight"), False, "last good weights were restored"
    t0 = time.monotonic()
    with pytest.raises(VLLMServerError, match=match):
        client.update_weights(state.items(), check=check)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"the failed push took {elapsed:.1f} s"
    rollouts = client.generate(PROMPTS, 2, PLAIN)
    assert max_logprob_error(server.current, rollouts) < TOL
    client.close()


def test_the_nccl_channel_on_a_cpu_client_is_refused_before_the_server_is_asked(server):
    t0 = time.monotonic()
    with pytest.raises(VLLMServerError, match="NCCL weight channel cannot work: the client is on cpu"):
        VLLMServerClient(server.url, device="cpu", channel="nccl")
    assert time.monotonic() - t0 < 5
    client = VLLMServerClient(server.url, device="cpu")  # the server is not waiting for anything
    one = SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_seeds=SEEDS[:1])
    assert max_logprob_error(server.current, client.generate(PROMPTS[:1], 1, one)) < TOL
    client.close()


def test_other_ranks_wait_for_the_owners_push_and_share_its_failure(server):
    owner = VLLMServerClient(server.url, device="cpu")
    other = VLLMServerClient(server.url, device="cpu", owner=False, session=owner.session)
    assert other.channel == "none"
    errors: list[BaseException] = []

    def other_rank_update():
        try:
            other.update_weights(iter(()))  # what other ranks pass is not used
        except BaseException as exc:
            errors.append(exc)

    # push 1: the other rank blocks until the owner's push has landed
    waiting = threading.Thread(target=other_rank_update)
    waiting.start()
    time.sleep(1.0)
    assert waiting.is_alive()
    model = copy.deepcopy(server.current)
    optimizer_step(model, seed=3)
    owner.update_weights(model.state_dict().items())
    server.current = model
    waiting.join(30)
    assert not waiting.is_alive() and not errors
    assert max_logprob_error(model, other.generate(PROMPTS, 2, PLAIN)) < TOL
    # push 2 fails on the owner: the other rank's update is an error too, at once
    waiting = threading.Thread(target=other_rank_update)
    waiting.start()
    with pytest.raises(VLLMServerError):
        owner.update_weights(_without(model.state_dict(), "model.norm.weight").items())
    waiting.join(10)
    assert not waiting.is_alive() and len(errors) == 1 and "failed" in str(errors[0])
    owner.close()
    other.close()


RANK_PROGRAM = """
import json, sys, time
from types import SimpleNamespace
import torch.distributed as dist
from safetensors.torch import load_file
from grpo.config import RunConfig
from rollout import make_engine
from rollout.base import SamplingParams

rank, port, url, weights, prompt, seed = sys.argv[1:7]
rank = int(rank)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cfg = RunConfig.model_validate({"rollout": {"engine": "vllm", "vllm": {"mode": "server", "server_url": url}}})
policy = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_moe", tie_word_embeddings=False))
engine = make_engine(cfg.rollout, policy, None, "cpu", seed=0)
if rank == 0:
    time.sleep(2.0)  # rank 1 would sample from the old weights if it did not wait
engine.update_weights(load_file(weights).items())  # every rank calls it after a step, as the trainer does
sampling = SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_seeds=(int(seed),))
rollouts = engine.generate([json.loads(prompt)], 2, sampling)
print(json.dumps({"owner": engine.owner, "channel": engine.channel,
                  "rollouts": [[r.prompt_ids, r.completion_ids, r.logprobs] for r in rollouts]}))
engine.close()
dist.destroy_process_group()
"""


def test_two_training_processes_share_the_server_and_rank_0_alone_pushes(server, tmp_path):
    """make_engine in two gloo ranks: rank 0 owns the client's pushes, rank 1's update_weights waits
    for it (rank 0 pushes 2 s late), then both sample from the new weights."""
    from safetensors.torch import save_file

    model = copy.deepcopy(server.current)
    optimizer_step(model, seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, str(rank), str(port), server.url,
                          str(tmp_path / "weights.safetensors"), str(PROMPTS[rank]), str(SEEDS[rank])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    server.current = model
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [(r["owner"], r["channel"]) for r in results] == [(True, "file"), (False, "none")]
    for rank, result in enumerate(results):
        rollouts = [SimpleNamespace(prompt_ids=tuple(p), completion_ids=tuple(c), logprobs=lp)
                    for p, c, lp in result["rollouts"]]
        assert rollouts[0].prompt_ids == tuple(PROMPTS[rank])
        assert max_logprob_error(model, rollouts) < TOL, f"rank {rank}"


def test_make_engine_gives_a_single_process_the_pushing_client(server):
    from grpo.config import RunConfig
    from rollout import make_engine

    cfg = RunConfig.model_validate({"rollout": {"engine": "vllm", "vllm": {"mode": "server", "server_url": server.url}}})
    engine = make_engine(cfg.rollout, server.current, None, "cpu", seed=0)
    assert isinstance(engine, VLLMServerClient) and engine.owner and engine.channel == "file"
    assert not hasattr(engine, "model")  # the trainer's sync_engine reads `engine.model` as the HF engine's module
    engine.close()
    with pytest.raises(ValueError, match="routed experts"):
        make_engine(cfg.rollout, server.current, None, "cpu", seed=0, record_routing=True)


def train_async_through(url: str, model_dir: Path, out: Path, *overrides: str) -> Path:
    """3 steps of `grpo train` with `trainer.max_staleness=1` on the server at `url` (serving
    `model_dir`), 2 prompts x 2 completions of 8 tokens, a length reward; checks that steps 2 and 3
    were sampled one version behind (step 3 with version 1). Returns the run directory."""
    args = ["train", "recipes/tiny-cpu.yaml", f"model.name_or_path={model_dir}", "rollout.engine=vllm",
            "rollout.vllm.mode=server", f"rollout.vllm.server_url={url}", "trainer.max_staleness=1",
            "trainer.steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=5", "trainer.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "eval.before_and_after=false",
            "logging.progress=false", "rewards.workers=0", "trainer.threads=2", "rollout.stop=[]",
            "rewards.functions=[{name: 'tests.async_plugins:text_length'}]", *overrides, "--output-dir", str(out)]
    r = subprocess.run([sys.executable, "-m", "grpo", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["async/staleness_max"] for row in rows] == [0.0, 1.0, 1.0]
    step3 = [json.loads(line) for line in (out / "rollouts" / "step-000003.jsonl").read_text().splitlines()]
    assert {row["policy_version"] for row in step3} == {1}
    return out


def test_asynchronous_training_samples_through_the_server_and_pushes_each_version(server, tmp_path):
    """`grpo train ... trainer.max_staleness=1` with the server engine: the generation process samples
    over HTTP and pushes the versions its steps need (0, then 1 for step 3); what the server samples
    from afterwards is the trainer's checkpoint of step 1, to 1e-4."""
    from transformers import AutoModelForCausalLM

    out = train_async_through(server.url, server.model_dir, tmp_path / "run", "trainer.lr=0.02")
    version1 = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000001" / "model", dtype=torch.float32)
    client = VLLMServerClient(server.url, device="cpu")
    rollouts = client.generate(PROMPTS, 2, PLAIN)
    client.close()
    assert max_logprob_error(version1, rollouts) < TOL
    assert max_logprob_error(server.current, rollouts) > 1e-2  # the run's pushes replaced what was served
    server.current = version1


def test_a_dead_server_is_a_clear_error_at_once():
    t0 = time.monotonic()
    with pytest.raises(VLLMServerError, match="did not answer"):
        VLLMServerClient(f"http://127.0.0.1:{free_port()}", device="cpu")
    assert time.monotonic() - t0 < 5


def test_seeded_prompts_go_one_per_request_with_the_colocated_engines_seeds():
    sampling = SamplingParams(max_new_tokens=4, stop=("</answer>",), prompt_seeds=(7, 1000))
    bodies = completion_bodies("tiny", [[7, 7], [8]], 2, sampling)
    assert [(start, body["prompt"], body["seed"]) for start, body in bodies] == [(0, [[7, 7]], 7), (1, [[8]], 1000)]
    body = bodies[0][1]
    assert body["model"] == "tiny" and body["n"] == 2 and body["logprobs"] == 0 and body["stop"] == ["</answer>"]
    assert body["return_token_ids"] is True
    ((start, unseeded),) = completion_bodies("tiny", [[7, 7], [8]], 2, SamplingParams(max_new_tokens=4))
    assert start == 0 and unseeded["prompt"] == [[7, 7], [8]] and "seed" not in unseeded


# --- GPU: the NCCL channel -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the server and the client on different GPUs")
def test_gpu_weights_go_over_nccl_to_a_server_on_another_gpu(tmp_path):
    """The server on GPU 1, the client on GPU 0: generate, sleep and wake, push a real optimizer
    step over NCCL in several transfers, a planted failure, then the last good weights."""
    model, tok = build_model()
    model.save_pretrained(tmp_path / "tiny-moe")
    tok.save_pretrained(tmp_path / "tiny-moe")
    proc, url = start_server(tmp_path / "tiny-moe", tmp_path / "server.log", {"CUDA_VISIBLE_DEVICES": "1"},
                             ("--gpu-memory-utilization", "0.2", "--enable-sleep-mode"))
    try:
        wait_for_health(url, proc, tmp_path / "server.log", 600)
        client = VLLMServerClient(url, device="cuda:0", group_port=free_port(), channel="nccl")
        assert max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN)) < 1e-3
        client.sleep(1)
        client.wake()
        optimizer_step(model, seed=1)
        client.update_weights(model.state_dict().items(), chunk_bytes=1 << 16)  # several transfers
        assert max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN)) < 1e-3
        t0 = time.monotonic()
        with pytest.raises(VLLMServerError, match="1 missing"):
            client.update_weights(_without(model.state_dict(), "model.norm.weight").items())
        assert time.monotonic() - t0 < 10
        assert max_logprob_error(model, client.generate(PROMPTS, 2, PLAIN)) < 1e-3
        client.close()
    finally:
        stop_server(proc)
