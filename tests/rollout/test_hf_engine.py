"""The transformers rollout engine against teacher-forced forward passes of the same model.

Real small models built from configs (a Qwen3-MoE and a dense Qwen3) and the character-level
tokenizer of `grpo.model.tiny`; nothing is downloaded. Both decode paths are checked: the fast
Qwen3 step (`fast_decode=True`) and the model's own forward (`fast_decode=False`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grpo.model.tiny import TinyBaseSpec, build_char_tokenizer, tiny_moe_config
from rollout.base import SamplingParams
from rollout.hf.engine import HFEngine
from rollout.hf.qwen3 import FastQwen3Stepper, _onednn_products, _Product

PATHS = [pytest.param(True, id="fast"), pytest.param(False, id="generic")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def moe(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    spec = TinyBaseSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                        expert_width=32)
    config = tiny_moe_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.output_router_logits = True  # as in the benchmark; the engine must cope
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():  # sharper than the default init, so sampled text is not uniform noise
        model.lm_head.weight.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def dense(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["User: 12+3=?\nAssistant:", "What is 7+8?", "9+9="]  # different lengths: left padding
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def teacher_forced(model, rollout, temperature: float = 1.0):
    """[C, V] log-softmax of the logits that scored each completion token, from one plain forward."""
    seq = torch.tensor([list(rollout.prompt_ids) + list(rollout.completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=seq, output_router_logits=False).logits[0].float()  # [S, V]
    start = len(rollout.prompt_ids) - 1
    scores = logits[start : start + len(rollout.completion_ids)] / temperature  # [C, V]
    return scores


def stop_id_for(engine, prompts, n, **kw) -> int:
    """A token that a seeded free run draws at position 3 of row 0: with it as a stop id the same
    run (same seed) stops row 0 early, so finished-row dropping is exercised."""
    free = engine.generate(prompts, n, SamplingParams(ignore_eos=True, **kw))
    return free[0].completion_ids[3]


# --- logprobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("which", ["moe", "dense"])
def test_logprobs_match_teacher_forced_forward(request, tokenizer, prompts, fast, which):
    model = request.getfixturevalue(which)
    engine = HFEngine(model, tokenizer, fast_decode=fast)
    assert engine.fast_decode == fast
    stop = stop_id_for(engine, prompts, 3, max_new_tokens=20, seed=0)
    out = engine.generate(prompts, 3, SamplingParams(max_new_tokens=20, stop_token_ids=(stop,), seed=0))
    assert any(r.finish_reason == "stop" for r in out), "no row finished early: row dropping untested"
    for r in out:
        expected = F.log_softmax(teacher_forced(model, r), -1)  # [C, V]
        expected = expected.gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0), (r.logprobs, expected)


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.6, 1.0), (8, 0.8, 0.7)])
def test_filtered_logprobs_are_under_the_renormalised_distribution(moe, tokenizer, prompts, fast, top_k, top_p,
                                                                   temperature):
    engine = HFEngine(moe, tokenizer, fast_decode=fast)
    sampling = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
                              ignore_eos=True, seed=3)
    for r in engine.generate(prompts, 2, sampling):
        scores = teacher_forced(moe, r, temperature)  # [C, V]
        for t, token in enumerate(r.completion_ids):
            # written independently of the engine, in the order vLLM and transformers apply them:
            # top-k first, then top-p over the renormalised top-k distribution
            probs = scores[t].softmax(-1)
            order = probs.argsort(descending=True).tolist()
            if top_k:
                order = order[:top_k]
            kept_mass = probs[order].sum().item()
            keep = torch.zeros_like(probs, dtype=torch.bool)
            mass = 0.0
            for idx in order:
                if mass >= top_p:
                    break
                keep[idx] = True
                mass += probs[idx].item() / kept_mass
            assert keep[token], f"token {token} drawn outside the top-k/top-p set"
            expected = torch.log(probs[token] / probs[keep].sum()).item()
            assert abs(r.logprobs[t] - expected) < 1e-4, (t, r.logprobs[t], expected)


# --- stopping and finish reasons --------------------------------------------------------------


def _greedy(engine, prompts, **kw):
    return engine.generate(prompts, 1, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, **kw))


@pytest.mark.parametrize("fast", PATHS)
def test_stop_strings_single_and_multi_token(moe, tokenizer, prompts, fast):
    engine = HFEngine(moe, tokenizer, fast_decode=fast)
    free = _greedy(engine, prompts)
    ref = free[0]
    assert ref.finish_reason == "length" and len(ref.completion_ids) == 16
    # a single-token stop string (one character) ends at its first occurrence
    single = tokenizer.decode(ref.completion_ids[5:6])
    first = next(i for i, t in enumerate(ref.completion_ids) if t == ref.completion_ids[5])
    out = _greedy(engine, prompts[:1], stop=(single,))[0]
    assert out.finish_reason == "stop" and out.completion_ids == ref.completion_ids[: first + 1]
    assert out.text.endswith(single)
    # a multi-token stop string ends where it first appears in the decoded text, kept in the text
    multi = tokenizer.decode(ref.completion_ids[6:9])
    end = ref.text.index(multi) + len(multi)
    out = _greedy(engine, prompts[:1], stop=(multi,))[0]
    assert out.finish_reason == "stop" and out.text == ref.text[:end]
    assert out.logprobs == pytest.approx(ref.logprobs[: len(out.logprobs)], abs=1e-6)
    # stop ids
    out = _greedy(engine, prompts[:1], stop_token_ids=(ref.completion_ids[3],))[0]
    assert out.finish_reason == "stop" and out.completion_ids[-1] == ref.completion_ids[3]


def test_eos_stops_unless_ignored(moe, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    engine = HFEngine(moe, tokenizer)
    a = engine.generate(prompts, 4, SamplingParams(max_new_tokens=24, seed=5))
    b = engine.generate(prompts, 4, SamplingParams(max_new_tokens=24, seed=5, ignore_eos=True))
    for r in a:
        if eos in r.completion_ids:
            assert r.completion_ids[-1] == eos and r.finish_reason == "stop"
            assert r.completion_ids.count(eos) == 1
        else:
            assert r.finish_reason == "length" and len(r.completion_ids) == 24
    assert all(r.finish_reason == "length" and len(r.completion_ids) == 24 for r in b)


# --- ordering, seeds, row dropping ------------------------------------------------------------


def test_prompt_major_order_and_groups(moe, tokenizer, prompts):
    out = HFEngine(moe, tokenizer).generate(prompts, 4, SamplingParams(max_new_tokens=6, seed=1))
    assert len(out) == 12
    for i, r in enumerate(out):
        assert r.group == i // 4 and r.prompt_ids == tuple(prompts[i // 4])
        assert len(r.logprobs) == len(r.completion_ids) and r.routed_experts is None


@pytest.mark.parametrize("fast", PATHS)
def test_seeds_reproduce(moe, tokenizer, prompts, fast):
    engine = HFEngine(moe, tokenizer, fast_decode=fast)
    s = SamplingParams(max_new_tokens=10, seed=7, stop_token_ids=(5,))
    a, b = engine.generate(prompts, 3, s), engine.generate(prompts, 3, s)
    c = engine.generate(prompts, 3, SamplingParams(max_new_tokens=10, seed=8, stop_token_ids=(5,)))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


@pytest.mark.parametrize("dense_rows,n_prompts,n,share,packed", [
    (64, 3, 3, 0.0, False), (64, 3, 3, 0.0, True), (0, 3, 3, 1.5, False), (64, 1, 1, 0.5, False),
    (64, 1, 3, 1.5, False)], ids=["dense-experts", "dense-experts-onednn", "sparse-experts", "chosen-experts",
                                  "chosen-experts-rows"])
def test_fast_and_generic_paths_agree(moe, tokenizer, prompts, dense_rows, n_prompts, n, share, packed, monkeypatch):
    """chosen-experts: one row, whose top-2 are half of the 4 experts, runs only those two (expert
    by expert); chosen-experts-rows: three rows (and then fewer) take that path, each expert any of
    them chose once on all three;
    dense-experts-onednn: every weight counts as large, so products of 4 rows or more run on
    oneDNN's packed copies (this model's weights are below `_Product.PACKED_MIN_BYTES`)."""
    prompts = prompts[:n_prompts]
    stop = stop_id_for(HFEngine(moe, tokenizer), prompts, n, max_new_tokens=16, seed=11)
    s = SamplingParams(max_new_tokens=16, seed=11, stop_token_ids=(stop,), record_routing=True)
    rows_seen, packs = [], []
    monkeypatch.setattr(FastQwen3Stepper, "CHOSEN_EXPERTS_MAX_SHARE", share)
    monkeypatch.setattr(FastQwen3Stepper, "_chosen_experts", staticmethod(
        lambda p, x, *a, _f=FastQwen3Stepper._chosen_experts: rows_seen.append(x.shape[0]) or _f(p, x, *a)))
    if packed:
        if not _onednn_products():
            pytest.skip("this torch build has no oneDNN linear")
        monkeypatch.setattr(_Product, "PACKED_MIN_BYTES", 0)
        monkeypatch.setattr(_Product, "_pack", lambda self, _f=_Product._pack: packs.append(id(self)) or _f(self))
    fast = HFEngine(moe, tokenizer, fast_decode=True, dense_experts_max_rows=dense_rows).generate(prompts, n, s)
    assert any(r.finish_reason == "stop" for r in fast)
    assert bool(packs) == packed and len(set(packs)) == len(packs)  # each weight packed once, on first use
    if dense_rows == 0 or share == 0:  # all sparse, or all dense
        assert not rows_seen
    elif n_prompts * n == 1:
        assert set(rows_seen) == {1}
    else:  # every row count took the chosen-experts path, three rows at first
        assert rows_seen and rows_seen[0] == 3
    generic = HFEngine(moe, tokenizer, fast_decode=False).generate(prompts, n, s)
    for a, b in zip(fast, generic):
        assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert torch.equal(a.routed_experts, b.routed_experts)


@pytest.mark.parametrize("fast", PATHS)
def test_dropping_finished_rows_changes_no_other_row(moe, tokenizer, prompts, fast):
    engine = HFEngine(moe, tokenizer, fast_decode=fast)
    free = _greedy(engine, prompts)
    stop_id = free[1].completion_ids[2]  # stops row 1 early; other rows may or may not contain it
    stopped = _greedy(engine, prompts, stop_token_ids=(stop_id,))
    assert stopped[1].finish_reason == "stop" and len(stopped[1].completion_ids) <= 3
    for a, b in zip(free, stopped):
        n = len(b.completion_ids)
        assert b.completion_ids == a.completion_ids[:n]
        assert b.logprobs == pytest.approx(a.logprobs[:n], abs=1e-5)
        assert (b.finish_reason == "length") == (stop_id not in a.completion_ids)


# --- routed experts ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
def test_routed_experts_match_teacher_forced_router_choices(moe, tokenizer, prompts, fast):
    engine = HFEngine(moe, tokenizer, fast_decode=fast)
    stop = stop_id_for(engine, prompts, 2, max_new_tokens=10, seed=2)
    out = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, seed=2, stop_token_ids=(stop,),
                                                     record_routing=True))
    assert any(r.finish_reason == "stop" for r in out)
    layers, top_k = moe.config.num_hidden_layers, moe.config.num_experts_per_tok
    for r in out:
        tokens = len(r.prompt_ids) + len(r.completion_ids) - 1
        assert r.routed_experts.shape == (tokens, layers, top_k)
        seq = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)[:-1]])
        with torch.no_grad():
            router_logits = moe(input_ids=seq, output_router_logits=True).router_logits  # L x [S, E]
        expected = torch.stack([lg.topk(top_k, dim=-1).indices for lg in router_logits], dim=1)  # [S, L, k]
        got = r.routed_experts.long()
        assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


def test_routing_on_a_dense_model_is_an_error(dense, tokenizer, prompts):
    with pytest.raises(ValueError, match="no MoE routers"):
        HFEngine(dense, tokenizer).generate(prompts, 1, SamplingParams(max_new_tokens=2, record_routing=True))


# --- weights and the factory ------------------------------------------------------------------


def test_fast_path_sees_updated_weights(tokenizer, prompts, moe):
    import copy

    model = copy.deepcopy(moe)
    engine = HFEngine(model, tokenizer)
    s = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    before = engine.generate(prompts, 1, s)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = engine.generate(prompts, 1, s)
    assert [r.logprobs for r in before] != [r.logprobs for r in after]
    for r in after:
        expected = F.log_softmax(teacher_forced(model, r), -1)
        expected = expected.gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)


def test_make_engine_builds_the_configured_hf_engine(moe, tokenizer):
    from grpo.config import RunConfig
    from rollout import make_engine

    cfg = RunConfig.model_validate({"rollout": {"engine": "hf", "hf": {"fast_decode": False}}})
    engine = make_engine(cfg.rollout, moe, tokenizer, "cpu", seed=0)
    assert isinstance(engine, HFEngine) and not engine.fast_decode
    cfg = RunConfig.model_validate({"rollout": {"engine": "vllm", "vllm": {"mode": "server", "tensor_parallel_size": 2}}})
    assert cfg.rollout.vllm.tensor_parallel_size == 2


def test_fast_path_folds_lora_adapters_into_its_weights(moe, tokenizer, prompts):
    """A peft model with adapters on the attention projections decodes on the fast path, with each
    adapter's scale * B A added to the weights it reads: the same tokens and log-probs as the
    adapted layers' own forwards. Adapters on the routed experts leave it to those forwards."""
    import copy

    from grpo.config import LoRAConfig
    from grpo.model.lora import apply_lora
    from tests.grpo.model.test_lora import randomize_adapters

    torch.manual_seed(3)
    model = apply_lora(copy.deepcopy(moe), LoRAConfig(rank=4, alpha=8)).eval()
    randomize_adapters(model, std=0.5)
    assert FastQwen3Stepper.supports(model)
    s = SamplingParams(max_new_tokens=12, seed=5)
    fast = HFEngine(model, tokenizer, fast_decode=True).generate(prompts, 2, s)
    generic = HFEngine(model, tokenizer, fast_decode=False).generate(prompts, 2, s)
    base = HFEngine(moe, tokenizer, fast_decode=True).generate(prompts, 2, s)
    assert [r.completion_ids for r in fast] == [r.completion_ids for r in generic] != [r.completion_ids for r in base]
    for a, b in zip(fast, generic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    experts = apply_lora(copy.deepcopy(moe), LoRAConfig(rank=4, alpha=8, experts=True))
    assert not FastQwen3Stepper.supports(experts)
