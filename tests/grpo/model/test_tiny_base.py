"""The built-in tiny base (grpo/model/tiny.py): its shape fits vLLM's CPU kernels, and its pretraining
rows keep documents apart.

Real pieces only: the character tokenizer built locally, a randomly initialised tiny Qwen3-MoE
from the base's own config; nothing is pretrained or downloaded here.
"""

from __future__ import annotations

import random

import pytest
import torch

from grpo.data.tasks import ArithmeticTask
from grpo.model.tiny import BUILTIN_BASES, DocumentPacker, TinyBaseSpec, build_char_tokenizer, tiny_moe_config

pytestmark = pytest.mark.usefixtures("one_thread")

# vLLM 0.32's CPU attention kernels (head_dim 8 or 24: "Unsupported CPU attention configuration")
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("name", sorted(BUILTIN_BASES))
def test_builtin_shape_fits_vllm_cpu(name, tokenizer):
    spec = BUILTIN_BASES[name]
    config = tiny_moe_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert config.model_type == "qwen3_moe"
    assert config.head_dim in VLLM_CPU_HEAD_SIZES or config.head_dim > 128
    # widths vLLM's CPU MoE would otherwise pad to a multiple of 32
    for width in (config.hidden_size, config.moe_intermediate_size, config.intermediate_size,
                  config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim):
        assert width % 32 == 0, (name, width)
    assert config.num_attention_heads % config.num_key_value_heads == 0


def _packer(tokenizer, **overrides) -> DocumentPacker:
    spec = TinyBaseSpec(**{"batch_size": 4, "row_tokens": 96, **overrides})
    return DocumentPacker(random.Random(0), ArithmeticTask(max_first=99, max_second=9), tokenizer, spec)


def test_packed_rows_restart_positions_at_every_document(tokenizer):
    input_ids, position_ids, labels = _packer(tokenizer).batch()
    assert input_ids.shape == position_ids.shape == labels.shape == (4, 96)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids, pos, lab in zip(input_ids.tolist(), position_ids.tolist(), labels.tolist()):
        assert pos[0] == 0
        text_len = max(i for i, t in enumerate(ids) if t == eos) + 1  # a row ends with a whole document
        for i in range(1, len(ids)):  # a new segment exactly after each <eos> and where padding begins
            restart = ids[i - 1] == eos or i == text_len
            assert pos[i] == (0 if restart else pos[i - 1] + 1), (i, ids[i - 1])
        assert lab[:text_len] == ids[:text_len] and set(lab[text_len:]) <= {-100}
        assert set(ids[text_len:]) <= {pad}


def test_attention_stays_inside_each_packed_document(tokenizer):
    """The packed training forward gives each document the logits it gets alone (block-diagonal
    attention read off the restarting positions), as `_pretrain` calls it."""
    from transformers import AutoModelForCausalLM

    spec = TinyBaseSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4, expert_width=32)
    config = tiny_moe_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager").train()
    input_ids, position_ids, _ = _packer(tokenizer, batch_size=2).batch()
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # [B, L, V]
        starts = [i for i, p in enumerate(position_ids[0].tolist()) if p == 0] + [input_ids.shape[1]]
        assert len(starts) >= 3, "the row should hold at least two documents"
        for lo, hi in zip(starts[:-2], starts[1:-1]):  # every document of the first row (not the padding tail)
            alone = model(input_ids=input_ids[:1, lo:hi], use_cache=False).logits[0]  # [hi-lo, V]
            torch.testing.assert_close(packed[0, lo:hi], alone, atol=1e-4, rtol=1e-4)


def test_tool_corpus_calls_the_tool_rarely_and_its_markers_are_single_tokens():
    """tiny-tool-moe's text: multiplications; about `tool_share` of the answers call the tool, in
    the python tool's format (what `rollout.tools.python_env` writes back), the markers one token each;
    the other answers restate the question before the value (copying practice), half of them tagged."""
    from grpo.model.tiny import TOOL_TAGS, corpus_task, tool_document

    spec = BUILTIN_BASES["tiny-tool-moe"]
    tok = build_char_tokenizer(tool_tags=True)
    assert all(len(tok.encode(tag, add_special_tokens=False)) == 1 for tag in TOOL_TAGS)
    assert len(build_char_tokenizer()) == len(tok) - len(TOOL_TAGS)  # the other bases' vocabulary is unchanged
    rng, task = random.Random(0), corpus_task(spec)
    docs = [tool_document(rng, task, spec) for _ in range(4000)]
    answers = [d for d in docs if "Assistant:" in d]
    calls = [d for d in answers if "Assistant: <code>" in d]
    assert 0.17 < len(calls) / len(answers) < 0.23
    q = calls[0].split("<code>print(")[1].split(")</code>")[0]
    a, b = map(int, q.split("*"))
    assert calls[0].endswith(f"<code>print({q})</code><output>{a * b}\n</output><answer>{a * b}</answer>")
    at_once = [d.split("Assistant: ")[1] for d in answers if d not in calls]
    questions = [d.split("User: ")[1].split("Assistant: ")[0] for d in answers if d not in calls]
    assert all(answer.split("=")[0] in question for answer, question in zip(at_once, questions))
    tagged = [answer for answer in at_once if answer.endswith("</answer>")]
    assert 0.45 < len(tagged) / len(at_once) < 0.55
    value = tagged[0].split("=")[1].split("<answer>")[0]
    assert tagged[0].endswith(f"={value}<answer>{value}</answer>")
    assert not any("<unk>" in tok.decode(tok.encode(d, add_special_tokens=False)) for d in docs[:200])


def test_a_cache_entry_wanted_by_several_workers_at_once_is_built_once(tmp_path):
    """Test workers and ranks that need the same base at once: one builds, the others wait for it
    (a lock beside the entry), and all get the same directory; nothing half-built is left."""
    import threading
    import time

    from grpo.model.cache import build_once

    builds: list[int] = []

    def build(tmp):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every other worker to arrive while this one builds
        (tmp / "config.json").write_text("{}")

    results: list = []
    workers = [threading.Thread(target=lambda: results.append(build_once(tmp_path / "base", build, "config.json")))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(builds) == 1 and results == [tmp_path / "base"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base.lock", "base"]  # no temporary left behind
