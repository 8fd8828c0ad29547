"""Multi-turn rollouts (`rollout.turns`, the transformers engine's loop, the python environment).

- the transformers engine continues through its KV cache: every policy token of a greedy
  multi-turn rollout is the argmax of a fresh forward over everything before it (environment
  tokens included), and its log-prob matches that forward's;
- the turn rules: end-of-sequence ends the rollout, "done" ends it, the turn limit and an
  observation with no room left end it as "length";
- the python environment finds the code block, runs it in the sandbox, wraps its output;
- environment names resolve like reward names.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from rollout.base import SamplingParams
from rollout.hf.engine import HFEngine
from rollout.turns import Episodes, Observation, TurnLimits
from tests.conftest import tiny_qwen3

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted:
    """Stops on any of `stop`; answers with a numbered observation until `calls` calls were made."""

    def __init__(self, stop: tuple[str, ...], calls: int = 3, text: str = " obs{} "):
        self.stop, self.calls, self.text = stop, calls, text
        self.seen: list[list[str]] = []

    def reset(self, example):
        return {"calls": 0, "example": example}

    def step(self, turns, state):
        self.seen.append(list(turns))
        state["calls"] += 1
        if state["calls"] > self.calls:
            return None
        return Observation(self.text.format(state["calls"]), status="error" if state["calls"] == 2 else "ok")

    def close(self):
        pass


@pytest.fixture(scope="module")
def model_tok():
    return tiny_qwen3("dense", tied=True, seed=1)


@pytest.mark.parametrize("fast_decode", [True, False], ids=["qwen3-stepper", "generic-stepper"])
def test_hf_multi_turn_continues_through_its_cache(model_tok, fast_decode):
    model, tok = model_tok
    prompts = [tok.encode("12+34=", add_special_tokens=False), tok.encode("abc", add_special_tokens=False)]
    env = Scripted(stop=(*(t for t in tok.get_vocab() if len(t) == 1), "<unk>"))  # every token ends a turn
    episodes = Episodes(env, tok, TurnLimits(max_turns=6), [{"i": 0}, {"i": 1}], max_new_tokens=40)
    rollouts = HFEngine(model, tok, fast_decode=fast_decode).generate(
        prompts, 1, SamplingParams(max_new_tokens=40, temperature=0.0), episodes=episodes)
    assert any(len(r.env_turns) >= 2 for r in rollouts), [r.env_turns for r in rollouts]
    for r in rollouts:
        assert len(r.policy_mask) == len(r.completion_ids) == len(r.logprobs)
        ids = list(r.prompt_ids) + list(r.completion_ids)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
        for i, (token, policy) in enumerate(zip(r.completion_ids, r.policy_mask)):
            row = logp[len(r.prompt_ids) + i - 1]
            if policy:
                assert int(row.argmax()) == token, f"policy token {i} is not the greedy choice after the env turns"
                assert abs(float(row[token]) - r.logprobs[i]) < 1e-4
            else:
                assert r.logprobs[i] == 0.0
        for start, end, _ in r.env_turns:
            assert tok.decode(list(r.completion_ids[start:end])).startswith(" obs")
            assert not any(r.policy_mask[start:end])
        assert r.num_completion_tokens == sum(r.policy_mask)
    # the environment saw the turns so far, policy first, alternating
    assert all(len(turns) % 2 == 1 for turns in env.seen)


def test_turn_rules_eos_done_turn_limit_and_no_room():
    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    env = Scripted(stop=("=",), calls=1, text=" observation ")
    ep = Episodes(env, tok, TurnLimits(max_turns=2), [{}] * 4, max_new_tokens=30)
    out = ep.handover([(0, ids("a="), "stop"), (1, ids("b") + [tok.eos_token_id], "eos"), (2, ids("c="), "stop"),
                       (3, ids("d" * 29), "stop")])
    assert out[0] == ids(" observation ") and out[1] is None and out[2] == ids(" observation ") and out[3] is None
    assert ep.completion(1)["finish_reason"] == "stop" and ep.completion(3)["finish_reason"] == "length"
    out = ep.handover([(0, ids("x="), "stop"), (2, ids("y"), "length")])
    assert out == [None, None]
    assert ep.completion(0)["finish_reason"] == "stop"  # the environment said done
    assert ep.completion(2)["finish_reason"] == "length"  # the turn hit its cap
    c = ep.completion(0)
    assert c["turns"] == 2 and c["policy_mask"] == (True, True) + (False,) * 13 + (True, True)
    assert c["env_turns"] == ((2, 15, "ok"),)
    ep2 = Episodes(Scripted(stop=("=",), calls=5, text="<o>"), tok, TurnLimits(max_turns=1), [{}], 30)
    assert ep2.handover([(0, ids("a="), "stop")]) == [None]
    assert ep2.completion(0)["finish_reason"] == "length"  # a call the turn limit leaves unanswered


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make setup)")
def test_python_environment_runs_the_last_block_and_wraps_its_output():
    from rollout.tools.python_env import python_tool

    env = python_tool(workers=1, timeout_s=1.0, max_output_chars=40)
    try:
        state = env.reset({})
        obs = env.step(["I will compute <code>print(17 * 23)</code>"], state)
        assert (obs.text, obs.status, obs.tool_call) == ("<output>391\n</output>", "ok", True)
        assert env.step(["no code here </answer>"], state) is None
        bad = env.step(["<code>print(1)</code> and <code>1/0</code>"], state)
        assert bad.status == "error" and bad.text.endswith("ZeroDivisionError: division by zero\n</output>")
        slow = env.step(["<code>while True: pass</code>"], state)
        assert slow.status == "timeout" and "[timed out]" in slow.text
        long = env.step(["<code>print('z' * 100)</code>"], state)
        assert long.text == "<output>" + "z" * 40 + "...</output>"
        assert state["calls"] == 4
    finally:
        env.close()


def test_environment_names_resolve_like_reward_names():
    from grpo.run.tools import UnknownEnvironmentError, resolve_environment
    from rollout.tools.python_env import python_tool

    assert resolve_environment("python") is python_tool
    assert resolve_environment("rollout.tools.python_env:python_tool") is python_tool
    with pytest.raises(UnknownEnvironmentError, match="unknown environment 'nope'; known names: openenv, python"):
        resolve_environment("nope")
    with pytest.raises(UnknownEnvironmentError, match="could not be imported"):
        resolve_environment("no_such_module:make")


def test_turn_segments_show_policy_text_tool_code_and_tool_output_apart():
    """The dashboard's pieces of a multi-turn rollout: the block a tool call answered is its own piece."""
    from grpo.model.tiny import build_char_tokenizer
    from grpo.run.step import turn_segments
    from rollout.base import Rollout

    tok = build_char_tokenizer(tool_tags=True)
    parts = [("let me run <code>print(2)</code>", True), ("<output>2</output>", False), (" so 2", True)]
    ids, mask = [], []
    for text, policy in parts:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [policy] * len(piece)
    start = mask.index(False)
    env_turns = ((start, start + mask.count(False), "ok"),)
    r = Rollout(group=0, prompt_ids=(5,), completion_ids=tuple(ids), logprobs=(0.0,) * len(ids), finish_reason="stop",
                text=tok.decode(ids), policy_mask=tuple(mask), env_turns=env_turns, turns=2)
    assert turn_segments(r, tok, ("<code>", "</code>")) == [
        {"kind": "policy", "text": "let me run "}, {"kind": "code", "text": "<code>print(2)</code>"},
        {"kind": "environment", "status": "ok", "text": "<output>2</output>"}, {"kind": "policy", "text": " so 2"}]
    assert [s["kind"] for s in turn_segments(r, tok)] == ["policy", "environment", "policy"]  # no markers: no split
