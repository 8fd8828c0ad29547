"""The colocated vLLM engine's context and CPU KV cache, derived from the recipe (`rollout.vllm.sizing`),
and what the trainer measures for it (`grpo.run.sampling.engine_lengths`). Pure arithmetic: no vLLM.

The numbers are a real 0.5B Qwen2's (24 layers, 2 KV heads of 64, 32k positions): in float32 one
token takes 24 x 2 x 2 x 64 x 4 = 24576 bytes, so vLLM's default (its whole 32k context) wanted
0.75 GiB of KV cache, three times the CPU default.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from grpo.config import RunConfig
from grpo.data.prompts import render_prompt
from grpo.data.sources import load_rows
from grpo.model.tiny import build_char_tokenizer
from grpo.run.sampling import engine_lengths
from rollout.vllm.sizing import EngineSizeError, engine_sizes, kv_bytes_per_token

QWEN2_05B = SimpleNamespace(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896,
                            max_position_embeddings=32768)
GIB, MIB = 2**30, 2**20


def sizes(**kw):
    args = dict(max_model_len=None, kv_cache_mb=None, longest_prompt=300, max_new_tokens=200, group_size=8,
                dtype="float32", on_cpu=True, free_bytes=64 * GIB)
    return engine_sizes(QWEN2_05B, **{**args, **kw})


def test_the_context_is_the_recipes_not_the_models():
    assert kv_bytes_per_token(QWEN2_05B, 4) == 24576
    s = sizes()
    assert s.max_model_len == 512  # 300 + 200 = 500, rounded up to 128s
    assert s.kv_cache_bytes == 256 * MIB  # one group needs (8 x 4 + 1) blocks x 128 x 24 KiB = 99 MiB: the floor
    assert s.sequences >= 8 and s.derived == ("max_model_len", "kv_cache")
    # without the recipe's lengths, vLLM's default (the model's context) and today's CPU KV cache stay
    assert sizes(longest_prompt=None).max_model_len is None and sizes(longest_prompt=None).kv_cache_bytes == 256 * MIB


def test_the_cpu_kv_cache_holds_a_whole_group_in_vllms_blocks():
    s = sizes(longest_prompt=1000, max_new_tokens=3000, group_size=16)
    assert s.max_model_len == 4096
    # 16 sequences x 32 blocks + vLLM's null block, each block 128 tokens x 24 KiB: 1539 MiB
    assert s.kv_cache_bytes == (16 * 32 + 1) * 128 * 24576
    assert s.sequences == 16
    mla = SimpleNamespace(num_hidden_layers=27, kv_lora_rank=512, qk_rope_head_dim=64, max_position_embeddings=163840)
    assert engine_sizes(mla, max_model_len=None, kv_cache_mb=None, longest_prompt=100, max_new_tokens=28,
                        group_size=4, dtype="bfloat16", on_cpu=True, free_bytes=GIB).max_model_len == 128


def test_the_recipes_own_values_win_and_gpus_size_their_kv_cache_themselves():
    s = sizes(max_model_len=2048, kv_cache_mb=300)
    assert (s.max_model_len, s.kv_cache_bytes, s.derived) == (2048, 300 * MIB, ())
    gpu = sizes(on_cpu=False)
    assert (gpu.max_model_len, gpu.kv_cache_bytes) == (512, None)


def test_the_context_never_exceeds_the_models_and_a_recipe_needing_more_is_one_line():
    assert sizes(longest_prompt=32000, max_new_tokens=700).max_model_len == 32768  # 32700 rounds to 32768 exactly
    short = SimpleNamespace(**{**vars(QWEN2_05B), "max_position_embeddings": 510})
    assert engine_sizes(short, max_model_len=None, kv_cache_mb=None, longest_prompt=300, max_new_tokens=200,
                        group_size=8, dtype="float32", on_cpu=True, free_bytes=GIB).max_model_len == 510
    with pytest.raises(EngineSizeError, match=r"context of 33000 tokens .*model has 32768 positions") as err:
        sizes(longest_prompt=32000, max_new_tokens=1000)
    assert "\n" not in str(err.value)


def test_a_kv_cache_larger_than_free_memory_is_one_line():
    with pytest.raises(EngineSizeError, match=r"1539 MiB \(16 sequences of 4096 tokens\) .* 1024 MiB free"):
        sizes(longest_prompt=1000, max_new_tokens=3000, group_size=16, free_bytes=GIB)
    with pytest.raises(EngineSizeError, match="kv_cache_memory_mb"):
        sizes(kv_cache_mb=2048, free_bytes=GIB)
    assert sizes(on_cpu=False, free_bytes=1).kv_cache_bytes is None  # GPU memory is vLLM's to check


def test_a_token_budget_below_the_context_on_cpu_is_one_line():
    with pytest.raises(EngineSizeError, match="max_num_batched_tokens=256 is less than the context"):
        sizes(max_num_batched_tokens=256)
    assert sizes(max_num_batched_tokens=512).max_model_len == 512
    assert sizes(max_num_batched_tokens=256, on_cpu=False).max_model_len == 512  # GPUs split prefills


def test_the_trainer_measures_its_longest_rendered_prompt_and_longest_completion():
    tok = build_char_tokenizer()
    cfg = RunConfig.model_validate({"rollout": {"engine": "vllm", "max_new_tokens": 20},
                                    "eval": {"max_new_tokens": 40, "num_prompts": 5}, "data": {"source": "arithmetic"}})
    train, heldout = load_rows(cfg.data, cfg.eval.num_prompts, tok)
    lengths = engine_lengths(cfg, tok, train, heldout)
    rows = train + heldout
    expected = max(len(tok.encode(render_prompt(cfg.data.template, r), add_special_tokens=False)) for r in rows)
    assert lengths == {"longest_prompt": expected, "max_new_tokens": 40}
    assert engine_lengths(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"engine": "hf"})}), tok, rows) == {}


def test_make_engine_refuses_a_recipe_the_model_cannot_hold_before_vllm_loads_anything(monkeypatch, caplog):
    """No vLLM needed: the platform is said to be CPU and the engine class is replaced by one that
    records its arguments (vLLM would load the checkpoint there)."""
    import rollout.vllm.engine
    import rollout.vllm.sizing
    from rollout import make_engine

    built = []
    monkeypatch.setattr(rollout.vllm.sizing, "vllm_on_cpu", lambda: True)
    monkeypatch.setattr(rollout.vllm.engine, "VLLMEngine", lambda checkpoint, **kw: built.append(kw) or "engine")
    model = SimpleNamespace(config=SimpleNamespace(**vars(QWEN2_05B), model_type="qwen2", tie_word_embeddings=True),
                            name_or_path="/models/qwen2-0.5b", dtype="torch.float32")
    cfg = RunConfig.model_validate({"rollout": {"engine": "vllm", "max_new_tokens": 200, "group_size": 8}})
    with pytest.raises(EngineSizeError, match="model has 32768 positions"):
        make_engine(cfg.rollout, model, None, "cpu", seed=0, longest_prompt=32700)
    assert built == []
    with caplog.at_level(logging.WARNING, logger="rollout"):
        assert make_engine(cfg.rollout, model, None, "cpu", seed=0, longest_prompt=300, max_new_tokens=250) == "engine"
    assert built[0]["max_model_len"] == 640 and built[0]["kv_cache_memory_bytes"] == 256 * MIB
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rollout"]
    assert "context 640 tokens (longest prompt 300 + 250 new" in line and "KV cache 256 MiB (holds" in line
