"""What the thinking block holds (rewards/thinking.py), the sums task (grpo/data/tasks.py) and the
format reward on prompts that open, begin or forbid the thinking block."""

from __future__ import annotations

import random
import time

import pytest

from grpo.data.tasks import SumsTask
from rewards.format import format_reward
from rewards.thinking import arithmetic_steps, steps_consistent, think_block, think_steps, written_think

OPENED = "User: Show work in <think></think> then answer in <answer></answer>. 47+8+6+9=?\nAssistant: <think>"
BEGUN = OPENED + "47+8+6+9="
FORBIDDEN = "User: Answer in <answer></answer>. 47+8+6+9=?\nAssistant: <think></think>"


@pytest.mark.parametrize("completion,prompt,expected", [
    ("<think>47+8+6+9=55+6+9=61+9=70</think><answer>70</answer>", None, True),
    ("<think>47+8+6+9=55+6+9=61+9=70</think><answer>71</answer>", None, False),  # answer is not the last value
    ("<think>47+8+6+9=55+6+9=62+9=71</think><answer>71</answer>", None, False),  # a step changes the value
    ("<think>70</think><answer>70</answer>", None, False),  # no step at all
    ("<think></think><answer>70</answer>", None, False),
    ("47+8+6+9=70", None, False),  # no thinking block
    ("<think>47+8+6+9=55+6+9=61+9=70", None, False),  # never closed
    ("<think>47+8+6+9=x+9=70</think><answer>70</answer>", None, False),  # a part that is not a sum
    ("<think>47+8+6+9=55+6+9=70</think><answer>70</answer>", None, True),  # stops early, every step holds
    ("<think>47+8+6+9=55+6+9</think><answer>70</answer>", None, False),  # one equality: no value reached
    ("<think>47+8+6+9=55+6+9</think><answer>69</answer>", None, False),
    ("55+6+9=61+9=70</think><answer>70</answer>", BEGUN, True),  # the prompt began the chain
    ("56+6+9=62+9=71</think><answer>71</answer>", BEGUN, False),  # its first step is checked against it
    ("70</think><answer>70</answer>", BEGUN, False),  # 47+8+6+9=70: right, but no worked step
    ("<think>3+4=7</think><answer>7</answer>", None, False),
    ("<answer>70</answer>", FORBIDDEN, False),
    ("<think>10-3=7, 7+5=12</think><answer>12</answer>", None, True),  # two lines of one step each
])
def test_steps_consistent(completion, prompt, expected):
    assert steps_consistent(completion, prompt) is expected
    assert think_steps(completion, {"answer": "70"}, prompt=prompt) == (1.0 if expected else 0.0)


def test_the_written_part_and_the_whole_block():
    assert written_think("55+6+9=61+9=70</think><answer>70</answer>", BEGUN) == "55+6+9=61+9=70"
    assert think_block("55+6+9=61+9=70</think><answer>70</answer>", BEGUN) == "47+8+6+9=55+6+9=61+9=70"
    assert written_think("<answer>70</answer>", FORBIDDEN) == ""
    assert written_think("70</think><answer>70</answer>", OPENED) == "70"
    assert written_think("no tags", OPENED) is None


def test_untrusted_text_is_read_in_bounded_time():
    huge = "<think>" + "1+" * 500_000 + "1=" + "9" * 100_000 + "</think><answer>1</answer>"
    started = time.perf_counter()
    assert steps_consistent(huge) is False
    assert arithmetic_steps("=" * 1_000_000) is not None
    assert time.perf_counter() - started < 2.0
    assert not steps_consistent("<think>" + "9" * 40 + "+1=" + "1" + "0" * 40 + "</think><answer>1</answer>")


@pytest.mark.parametrize("completion,prompt,expected", [
    ("<answer>70</answer>", FORBIDDEN, 1.0),  # thinking forbidden: the answer part alone
    ("<think>x</think><answer>70</answer>", FORBIDDEN, 0.0),  # the block may not be opened again
    ("55+6+9=61+9=70</think><answer>70</answer>", BEGUN, 1.0),
    ("<think>55</think><answer>70</answer>", BEGUN, 0.0),
    ("61+9=70</think><answer>70</answer>", OPENED, 1.0),
])
def test_format_on_prompts_that_open_begin_or_forbid_thinking(completion, prompt, expected):
    assert format_reward(completion, {}, prompt=prompt) == expected


def test_sums_task_rows_chains_and_split():
    task = SumsTask(terms=3, min_first=10, max_first=19, max_term=3)
    rows = task.all_rows()
    assert len(rows) == 10 * 3 * 3 and len({r["question"] for r in rows}) == len(rows)
    assert all(sum(map(int, r["question"].split("+"))) == int(r["answer"]) for r in rows)
    train, held = task.split(20, seed=0)
    assert len(held) == 20 and not {r["question"] for r in held} & {r["question"] for r in train}
    rng = random.Random(0)
    for _ in range(50):
        terms = task.sample_terms(rng)
        chain = SumsTask.chain(terms)
        assert chain.startswith("+".join(map(str, terms)) + "=") and chain.endswith(f"={sum(terms)}")
        assert steps_consistent(f"<think>{chain}</think><answer>{sum(terms)}</answer>")
    with pytest.raises(ValueError, match="terms >= 2"):
        SumsTask(terms=1)
