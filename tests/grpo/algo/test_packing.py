"""Padding-free micro-batches (grpo.algo.packing): the sequences of a micro-batch packed into one
row must give what right-padded micro-batches give: log-probs, entropy, gradients, the loss and
its metrics, expert-load counts, with shared prompts on and off, routing replay R2 and R3, token
budgets that cut the batch into several micro-batches, mini-batches and activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.algo.moe import RouterControl
from grpo.algo.packing import packed_logprobs, packing_supported
from grpo.algo.update import collate, policy_update
from grpo.config import RunConfig
from tests.grpo.algo.test_moe import sample_with_bf16_sampler, tiny_moe
from tests.grpo.algo.test_shared_prompts import _update as padded_update
from tests.grpo.algo.test_shared_prompts import float64_reference, mixed_rollouts, r3_update


def tiny_dense():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from grpo.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    return Qwen3ForCausalLM(cfg), tok


def model_of(family: str):
    return tiny_dense() if family == "qwen3" else tiny_moe(family)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("share", [False, True])
def test_logprobs_and_entropy_equal_the_padded_forward(family, share):
    model, batch, (rows, cols), full_lp, full_ent = float64_reference(*model_of(family))
    assert packing_supported(model)
    lp, ent = packed_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], 0.7,
                              with_entropy=True, chunk=5, share_prompts=share)
    # float64 model (transformers' RMSNorm rounds to float32 inside it): measured <= 1e-15 here; a
    # token attending across a sequence boundary or a position id off by one moves it by ~1e-2
    torch.testing.assert_close(lp[rows, cols], full_lp[rows, cols], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent[rows, cols], full_ent[rows, cols], atol=1e-6, rtol=1e-5)
    outside = torch.ones_like(lp, dtype=torch.bool)
    outside[rows, cols] = False
    assert not lp[outside].any() and not ent[outside].any()  # zeros at prompt and padding entries


def test_a_packed_row_holds_no_padding():
    """The decoder sees one row per forward: every real token once, no padding; with shared
    prompts, one row of the distinct prompts once, then the completions."""
    model, tok = tiny_moe("qwen3_moe")
    rollouts = mixed_rollouts(tok)
    batch = collate(rollouts, tok.pad_token_id)
    shapes = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    for share in (False, True):
        packed_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], share_prompts=share)
    handle.remove()
    prompts = {r.prompt_ids for r in rollouts}
    total = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    completions = sum(len(r.completion_ids) for r in rollouts)
    assert shapes == [(1, total), (1, sum(map(len, prompts)) + completions)]


def _update(model, rollouts, tok, cfg_dict, budget: int | None, shared: bool = True):
    """test_shared_prompts' lr-0 update, with micro-batches packed up to `budget` tokens (None: padded)."""
    trainer = {**cfg_dict.get("trainer", {}), "max_tokens_per_micro_batch": budget}
    return padded_update(model, rollouts, tok, {**cfg_dict, "trainer": trainer}, shared)


def _assert_same_update(packed, padded):
    (metrics, grads, counts), (full_metrics, full_grads, full_counts) = packed, padded
    assert full_grads.keys() == grads.keys() and grads
    for name, grad in full_grads.items():  # a token lost or attended across rows: ~1e-1 relative
        assert ((grads[name] - grad).norm() / grad.norm().clamp(min=1e-30)).item() < 1e-6, name
    assert metrics.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-10), key
    assert (counts is None and full_counts is None) or torch.equal(counts, full_counts)


SETTINGS = {
    "grpo": {},
    "aux_loss": {"moe": {"aux_loss_coef": 0.5}},
    "r2_two_passes": {"moe": {"routing_replay": "R2"}, "algorithm": {"num_iterations": 2}},
    "mini_batches_beta": {"algorithm": {"mini_batches": 2, "beta": 0.1}},
}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("budget", [40])  # several packed micro-batches (one: the R3 test below)
@pytest.mark.parametrize("shared", [False, True])
def test_update_equals_the_padded_update(family, setting, budget, shared):
    """Same gradients, loss, metrics and expert-load counts (float64) as right-padded micro-batches."""
    if family == "qwen3" and setting in ("aux_loss", "r2_two_passes"):
        pytest.skip("MoE settings")
    if setting == "aux_loss" and budget == 40:
        pytest.skip("the load-balancing loss is taken per micro-batch (not additive), so it needs the same cut")
    model, tok = model_of(family)
    model = model.double()
    rollouts = mixed_rollouts(tok, seed=1)
    cfg = {"moe": {"metrics": True}, **SETTINGS[setting]}
    if setting == "mini_batches_beta":
        ref = copy.deepcopy(model)
        cfg_obj = {**cfg, "trainer": {"prompts_per_step": 2}}
        packed = _update_with_ref(model, ref, rollouts, tok, cfg_obj, budget, shared)
        padded = _update_with_ref(model, ref, rollouts, tok, cfg_obj, None, shared)
    else:
        packed = _update(model, rollouts, tok, cfg, budget, shared)
        padded = _update(model, rollouts, tok, cfg, None, shared)
    _assert_same_update(packed, padded)
    if setting == "aux_loss":
        assert packed[0]["train/moe_aux_loss"] > 0


def _update_with_ref(model, ref, rollouts, tok, cfg_dict, budget, shared):
    trainer = {**cfg_dict.get("trainer", {}), "max_tokens_per_micro_batch": budget, "shared_prompt_forward": shared}
    cfg = RunConfig.model_validate({**cfg_dict, "trainer": trainer})
    m = copy.deepcopy(model)
    control = RouterControl(m, cfg.moe)
    metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), rollouts, cfg, tok.pad_token_id,
                            torch.device("cpu"), ref_model=ref, moe=control)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    counts = control.take_counts()
    control.close()
    return metrics, grads, counts


@pytest.mark.parametrize("shared", [False, True])
def test_r3_replays_the_engines_experts_in_packed_order(shared, monkeypatch):
    """Every packed token runs exactly the experts the sampler recorded for it, and the update
    equals the padded R3 update."""
    monkeypatch.setattr("grpo.algo.packing.PACK_MIN_PADDING", 0.0)  # equal-length completions: pack anyway
    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    spy = r3_update(model, rollouts, tok, {"shared_prompt_forward": shared})
    calls = [torch.stack(c, 1) for c in spy.calls]  # per forward [T, L, k]
    checked = 0
    if shared:  # one row: the distinct prompts, then the completions
        (call,) = calls
        prompts = list(dict.fromkeys(r.prompt_ids for r in rollouts))
        prompt_call, completion_call = call[: sum(map(len, prompts))], call[sum(map(len, prompts)):]
        starts = [sum(map(len, prompts[:i])) for i in range(len(prompts))]
        offset = 0
        for r in rollouts:
            n, rec = len(r.prompt_ids), r.routed_experts.long()  # [n + m - 1, L, k]
            start = starts[prompts.index(r.prompt_ids)]
            assert torch.equal(prompt_call[start: start + n], rec[:n])
            m = rec.shape[0] - n  # completion tokens fed back (all but the last)
            assert torch.equal(completion_call[offset: offset + m], rec[n:])
            offset += len(r.completion_ids)
            checked += n + m
    else:
        (call,) = calls
        offset = 0
        for r in rollouts:
            rec = r.routed_experts.long()
            assert torch.equal(call[offset: offset + rec.shape[0]], rec)
            offset += len(r.prompt_ids) + len(r.completion_ids)
            checked += rec.shape[0]
    assert checked > 100
    cfg_dict = {"moe": {"routing_replay": "R3", "metrics": True}}
    _assert_same_update(_update(model.double(), rollouts, tok, cfg_dict, 64, shared),
                        _update(model.double(), rollouts, tok, cfg_dict, None, shared))


def test_activation_checkpointing_recomputes_the_packed_layout(monkeypatch):
    """Checkpointed layers recompute their forward in the backward: with packing and R3 the
    recompute must see the same packed row and the same replayed experts."""
    monkeypatch.setattr("grpo.algo.packing.PACK_MIN_PADDING", 0.0)
    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok, n_prompts=2)
    model = model.double()
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_enable")(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = {"moe": {"routing_replay": "R3", "metrics": True}, "trainer": {"gradient_checkpointing": True}}
    shared_rows = _count_shared_forwards(monkeypatch)
    packed = _update(model, rollouts, tok, cfg, 40)
    assert shared_rows, "the packed update under checkpointing should share its prompts"
    _assert_same_update(packed, _update(model, rollouts, tok, cfg, None))


def _count_shared_forwards(monkeypatch) -> list:
    """A list that grows by one per shared-prompt packed forward from now on."""
    import grpo.algo.packing as packing

    calls, forward = [], packing._shared_forward
    monkeypatch.setattr(packing, "_shared_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


WRAPPED_SCRIPT = """
import copy, tempfile
import torch, torch.distributed as dist
import grpo.algo.packing as packing
from grpo.algo.logprobs import token_logprobs
from grpo.algo.update import collate, micro_batch_logprobs
from grpo.run.processes import fully_shard_cpu
from tests.grpo.algo.test_moe import tiny_moe
from tests.grpo.algo.test_shared_prompts import mixed_rollouts

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
packing.PACK_MIN_PADDING = 0.0
calls, forward = [], packing._shared_forward
packing._shared_forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
model, tok = tiny_moe("qwen3_moe")
model = model.double()
batch = collate(mixed_rollouts(tok), tok.pad_token_id)
scored = batch["mask"] > 0  # [B, S-1]
reference = copy.deepcopy(model)
full, _ = token_logprobs(reference, batch["input_ids"], batch["attention_mask"])
full[scored].sum().backward()
grads = {n: p.grad for n, p in reference.named_parameters()}
for kind in ("ddp", "fsdp2"):
    calls.clear()
    policy = copy.deepcopy(model)
    wrapped = (torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=True) if kind == "ddp"
               else fully_shard_cpu(policy))
    lp, _ = micro_batch_logprobs(wrapped, batch, slice(None), 1.0, 512, batch["prompt_lens"], packed=True)
    assert calls == [1], (kind, calls)
    torch.testing.assert_close(lp[scored], full[scored], atol=1e-6, rtol=1e-5)
    lp[scored].sum().backward()
    for name, p in policy.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if grads[name] is None:
            assert grad is None or not grad.any(), (kind, name)
            continue
        error = ((grad - grads[name]).norm() / grads[name].norm().clamp(min=1e-30)).item()
        assert error < 1e-6, (kind, name, error)
    print(kind, "ok", int(scored.sum()))
dist.destroy_process_group()
"""


def test_shared_prompt_packed_forward_runs_under_ddp_and_fsdp2():
    """The shared-prompt packed row is one forward of the wrapped model, so a DDP- or FSDP2-wrapped
    policy shares its prompts too: the same log-probs and gradients as the unwrapped
    one-row-per-sequence forward (gloo, one process, in a subprocess so no process group outlives
    the test)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run([sys.executable, "-c", WRAPPED_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0].startswith("ddp ok ") and lines[1].startswith("fsdp2 ok ") and int(lines[0].split()[2]) > 20


def test_other_attention_implementations_keep_the_padded_forward():
    model, tok = tiny_moe("qwen3_moe")
    assert packing_supported(model)
    model.config._attn_implementation = "eager"
    assert not packing_supported(model)
    ddp_like = torch.nn.Module()
    ddp_like.module = tiny_moe("qwen3_moe")[0]
    assert packing_supported(ddp_like)  # wrapped models pack too (one forward through the wrapper)
    shapes = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    rollouts = mixed_rollouts(tok)
    _update(model, rollouts, tok, {}, 4096, shared=False)
    handle.remove()
    batch = collate(rollouts, tok.pad_token_id)
    assert shapes == [tuple(batch["input_ids"].shape)]  # one right-padded forward


def test_hardly_padded_micro_batches_run_padded():
    """Below PACK_MIN_PADDING of padding the right-padded forward runs (it is cheaper there)."""
    from grpo.algo.packing import PACK_MIN_PADDING

    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok, n_prompts=2)  # 12-token completions, prompts 22-23 tokens
    batch = collate(rollouts, tok.pad_token_id)
    assert 0 < 1 - batch["attention_mask"].float().mean() < PACK_MIN_PADDING
    shapes = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    _update(model, rollouts, tok, {}, 4096, shared=False)
    handle.remove()
    assert shapes == [tuple(batch["input_ids"].shape)]


@pytest.mark.parametrize("share", [False, True])
def test_rows_without_completion_tokens_give_zeros_that_backpropagate(share):
    model, tok = tiny_moe("qwen3_moe")
    batch = collate(mixed_rollouts(tok), tok.pad_token_id)
    lens = batch["attention_mask"].sum(-1)  # every row scored from its end: no completion token
    lp, ent = packed_logprobs(model, batch["input_ids"], batch["attention_mask"], lens, with_entropy=True,
                              share_prompts=share)
    assert not lp.any() and not ent.any() and lp.shape == batch["mask"].shape
    lp.sum().backward()  # a loss over no tokens still has a graph (DDP/FSDP need the backward)
