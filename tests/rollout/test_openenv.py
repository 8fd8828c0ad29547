"""OpenEnv environments in multi-turn rollouts (`rollout.tools.openenv_env`), written for OpenEnv and
run unchanged: the echo environment that OpenEnv's own `openenv init` generates (its template, as a
new OpenEnv user starts), loaded by class path.

- the adapter: the policy's action text fills the action model's text field, the observation comes
  back as text inside the observation tags, rewards add up, a validation error is an error
  observation, settings it cannot use are one-line errors naming the key;
- `grpo train` with `rollout.tools.environment=openenv` and the built-in `environment` reward:
  the tiny base's answers go to the echo environment, its echo is the next turn's context, and its
  rewards are the run's rewards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openenv", reason="OpenEnv is in the dev extra (pip install openenv-core)")

from grpo.config import ToolsConfig  # noqa: E402
from grpo.run.tools import make_environment  # noqa: E402
from rollout.tools.openenv_env import OpenEnvError  # noqa: E402
from tests.conftest import ROOT, run_cli  # noqa: E402

ECHO = "echo_env.server.echo_env_environment:EchoEnvironment"


@pytest.fixture(scope="module")
def echo_env(tmp_path_factory):
    """The directory holding `echo_env`, the environment `openenv init echo_env` writes."""
    root = tmp_path_factory.mktemp("openenv")
    cli = Path(sys.executable).with_name("openenv")
    result = subprocess.run([str(cli), "init", "echo_env", "--output-dir", str(root)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_the_echo_environment_runs_behind_the_turn_interface(echo_env):
    env = make_environment(ToolsConfig(environment="openenv", kwargs={
        "environment": ECHO, "stop": ["</answer>"], "action_open": "<answer>", "observation_fields": ["echoed_message"]}))
    assert env.action_field == "message" and env.stop == ("</answer>",)
    state = env.reset({"question": "1+2"})
    obs = env.step(["<think>sum</think><answer>3</answer>"], state)
    assert obs.text == "<observation>3</observation>" and obs.reward == pytest.approx(0.1) and not obs.done
    assert env.step(["no stop string"], state) is None  # a turn the environment does not take ends the episode
    both = make_environment(ToolsConfig(environment="openenv", kwargs={"environment": ECHO}))
    text = both.step(["say <action>hello</action>"], both.reset({})).text
    assert text == "<observation>echoed_message: hello\nmessage_length: 5</observation>"


def test_unusable_settings_are_one_line_errors_naming_the_key(echo_env):
    with pytest.raises(OpenEnvError, match="cannot load 'echo_env.nope:Env'"):
        make_environment(ToolsConfig(environment="openenv", kwargs={"environment": "echo_env.nope:Env"}))
    with pytest.raises(OpenEnvError, match="not an OpenEnv Environment class"):
        make_environment(ToolsConfig(environment="openenv", kwargs={"environment": "echo_env.models:EchoAction"}))
    with pytest.raises(OpenEnvError, match="has no field 'text'"):
        make_environment(ToolsConfig(environment="openenv", kwargs={"environment": ECHO, "action_field": "text"}))
    with pytest.raises(OpenEnvError, match=r"unknown key\(s\) \['stops'\]"):
        make_environment(ToolsConfig(environment="openenv", kwargs={"environment": ECHO, "stops": ["x"]}))


def test_grpo_train_with_an_openenv_environment_and_its_rewards(echo_env, tmp_path, tiny_base):
    out = tmp_path / "run"
    tools = ("rollout.tools={environment: openenv, max_turns: 2, max_observation_tokens: 24, kwargs: "
             f"{{environment: '{ECHO}', stop: ['</answer>'], action_open: '<answer>', "
             "observation_fields: [echoed_message], observation_open: ' echo ', observation_close: ' '}}")
    result = run_cli("train", "recipes/tiny-cpu.yaml", "trainer.steps=2", "trainer.prompts_per_step=2",
                     "rollout.group_size=4", "rollout.max_new_tokens=48", "eval.before_and_after=false",
                     "logging.progress=false", "rewards.workers=0", "trainer.threads=1", "logging.rollouts_every=1",
                     "moe.routing_replay=none", tools, "rewards.functions=[{name: environment, weight: 1.0}]",
                     "--output-dir", str(out), env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(echo_env)])})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for path in sorted((out / "rollouts").glob("*.jsonl"))
            for line in path.read_text().splitlines()]
    answered = [r for r in rows if any(seg["kind"] != "policy" for seg in r["segments"])]
    assert answered, "no rollout reached the environment"
    for r in rows:  # the echo environment's reward: 0.1 per character of each answer it was sent
        turns = [seg["text"] for seg in r["segments"] if seg["kind"] == "policy" and seg["text"].endswith("</answer>")]
        sent = [turn.split("<answer>")[-1].removesuffix("</answer>") for turn in turns]
        assert r["rewards"]["environment"] == pytest.approx(0.1 * sum(len(s) for s in sent)), r["segments"]
    for r in answered:  # what the environment echoed is the next turn's context
        env_texts = [seg["text"] for seg in r["segments"] if seg["kind"] != "policy"]
        assert env_texts[0].startswith(" echo "), r["segments"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and any(m["reward/environment"] > 0 for m in metrics)
