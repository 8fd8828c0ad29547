"""Shared-prompt training forwards (grpo.algo.logprobs.shared_prompt_logprobs): each distinct prompt of a
micro-batch runs once and its completions run on copies of its KV cache. Everything the update
computes must equal the one-forward-per-row path: log-probs, entropy, gradients, the loss and its
metrics, expert-load counts, the load-balancing loss, and routing replay (R2, R3)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from grpo.algo.logprobs import shared_prompt_logprobs, shared_prompt_supported, token_logprobs
from grpo.algo.moe import RouterControl
from grpo.algo.update import collate, policy_update
from grpo.config import RunConfig
from rollout.base import Rollout
from tests.grpo.algo.test_moe import ExpertsSpy, sample_with_bf16_sampler, tiny_moe

FAMILIES = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"]


def mixed_rollouts(tok, seed: int = 0) -> list[Rollout]:
    """Three prompts of different lengths, 1 to 4 rows each, rows interleaved, completions of
    different lengths (so both layouts need padding)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("User: 12+3=? Assistant:", "7+4=", "Q: 45+6? A:")]
    plan = [0, 1, 0, 2, 0, 1, 0, 2, 2]  # prompt of each row, interleaved
    rollouts = []
    for p in plan:
        n = int(torch.randint(1, 9, (1,), generator=gen))
        completion = torch.randint(3, len(tok), (n,), generator=gen).tolist()
        rollouts.append(Rollout(group=p, prompt_ids=tuple(prompts[p]), completion_ids=tuple(completion), text="",
                                logprobs=tuple(torch.rand(n, generator=gen).neg().tolist()), finish_reason="stop",
                                advantage=float(torch.randn(1, generator=gen))))
    return rollouts


def completion_entries(rollouts) -> list[tuple[int, int]]:
    return [(b, len(r.prompt_ids) - 1 + j) for b, r in enumerate(rollouts) for j in range(len(r.completion_ids))]


def float64_reference(model, tok):
    """(the float64 model, mixed_rollouts' batch, (rows, cols) of its completion entries, and the
    one-forward log-probs and entropy at temperature 0.7): what a faster forward must equal."""
    model = model.double()
    rollouts = mixed_rollouts(tok)
    batch = collate(rollouts, tok.pad_token_id)
    full_lp, full_ent = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 0.7, with_entropy=True)
    return model, batch, tuple(zip(*completion_entries(rollouts))), full_lp, full_ent


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_entropy_equal_the_full_forward(family):
    model, batch, (rows, cols), full_lp, full_ent = float64_reference(*tiny_moe(family))
    assert shared_prompt_supported(model)
    lp, ent = shared_prompt_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], 0.7,
                                     with_entropy=True, chunk=3)
    # Often bit-identical; but transformers' RMSNorm rounds to float32 inside a float64 model, and
    # the one-forward reference itself is not bit-reproducible on 2 threads (30 repeats of it gave 2
    # distinct results): up to 2.4e-5 was seen on log-probs of about -4.4. A wrong position or mask
    # is ~1e-1.
    torch.testing.assert_close(lp[rows, cols], full_lp[rows, cols], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent[rows, cols], full_ent[rows, cols], atol=1e-6, rtol=1e-5)
    outside = torch.ones_like(lp, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.equal(lp[outside], torch.zeros_like(lp[outside]))  # zeros at prompt and padding entries


def test_prompts_run_once():
    model, tok = tiny_moe("qwen3_moe")
    rollouts = mixed_rollouts(tok)
    batch = collate(rollouts, tok.pad_token_id)
    shapes = []
    handle = model.get_decoder().register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                           with_kwargs=True)
    token_logprobs(model, batch["input_ids"], batch["attention_mask"], prompt_lens=batch["prompt_lens"])
    handle.remove()
    longest_prompt = max(len(r.prompt_ids) for r in rollouts)
    longest_completion = max(len(r.completion_ids) for r in rollouts)
    assert shapes == [(3, longest_prompt), (len(rollouts), longest_completion)]


def _update(model, rollouts, tok, cfg_dict, shared: bool):
    """One policy update (lr 0) on right-padded micro-batches (packed ones: tests/grpo/algo/test_packing.py)."""
    trainer = {"max_tokens_per_micro_batch": None, **cfg_dict.get("trainer", {}), "shared_prompt_forward": shared}
    cfg = RunConfig.model_validate({**cfg_dict, "trainer": trainer})
    m = copy.deepcopy(model)
    control = RouterControl(m, cfg.moe)
    metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), rollouts, cfg, tok.pad_token_id,
                            torch.device("cpu"), moe=control)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    counts = control.take_counts()
    control.close()
    return metrics, grads, counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", ["grpo", "aux_loss", "r2_two_passes", "micro_batches_of_2"])
def test_update_equals_the_full_forward(family, setting):
    """Same gradients, loss, metrics and expert-load counts (float64), with the MoE scope on."""
    model, tok = tiny_moe(family)
    model = model.double()
    rollouts = mixed_rollouts(tok, seed=1)
    cfg = {"moe": {"metrics": True}}
    if setting == "aux_loss":
        cfg = {"moe": {"aux_loss_coef": 0.5}}
    elif setting == "r2_two_passes":
        cfg = {"moe": {"routing_replay": "R2"}, "algorithm": {"num_iterations": 2}}
    elif setting == "micro_batches_of_2":
        cfg = {"trainer": {"micro_batch_size": 2}}
    full_metrics, full_grads, full_counts = _update(model, rollouts, tok, cfg, shared=False)
    metrics, grads, counts = _update(model, rollouts, tok, cfg, shared=True)
    assert full_grads.keys() == grads.keys() and grads
    # transformers' RMSNorm computes its statistics in float32 even in a float64 model, so gradients
    # that sum over a shared prompt agree with per-row ones to float32 rounding (~1e-7 measured);
    # losing one row's contribution to a prompt would be off by ~1e-1
    for name, grad in full_grads.items():
        assert ((grads[name] - grad).norm() / grad.norm().clamp(min=1e-30)).item() < 1e-6, name
    assert metrics.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-10), key  # (router logits: float32)
    if setting == "aux_loss":
        assert metrics["train/moe_aux_loss"] > 0
    assert torch.equal(counts, full_counts)


def test_r3_replays_the_engines_experts_with_shared_prompts():
    """The engine prefills a group's prompt once, so a group's rows carry the same prompt routing;
    the shared forward runs exactly the recorded experts at every position."""
    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    for r in rollouts[1:4]:  # rows of group 0 recorded identical prompt routing
        n = len(r.prompt_ids)
        assert torch.equal(r.routed_experts[:n], rollouts[0].routed_experts[:n])
    spy = r3_update(model, rollouts, tok)
    prompt_call, completion_call = (torch.stack(c, 1) for c in spy.calls)  # [P*Wp, L, k], [B*Wc, L, k]
    prompts = list(dict.fromkeys(r.prompt_ids for r in rollouts))
    wp = max(map(len, prompts))
    wc = max(len(r.completion_ids) for r in rollouts)
    prompt_call = prompt_call.view(len(prompts), wp, *prompt_call.shape[1:])
    completion_call = completion_call.view(len(rollouts), wc, *completion_call.shape[1:])
    checked = 0
    for b, r in enumerate(rollouts):
        n, rec = len(r.prompt_ids), r.routed_experts.long()  # [n + m - 1, L, k]
        p = prompts.index(r.prompt_ids)
        assert torch.equal(prompt_call[p, wp - n :], rec[:n])
        m = rec.shape[0] - n  # completion tokens fed back (all but the last)
        assert torch.equal(completion_call[b, :m], rec[n:])
        checked += n + m
    assert checked > 100


def r3_update(model, rollouts, tok, trainer: dict | None = None) -> ExpertsSpy:
    """One R3 policy update (lr 0), on right-padded micro-batches unless `trainer` (recipe trainer
    fields) says otherwise; returns the spy holding the experts every forward ran."""
    trainer = {"max_tokens_per_micro_batch": None} if trainer is None else trainer
    cfg = RunConfig.model_validate({"moe": {"routing_replay": "R3"}, "trainer": trainer})
    control = RouterControl(model, cfg.moe)
    spy = ExpertsSpy(model)
    policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), rollouts, cfg, tok.pad_token_id,
                  torch.device("cpu"), moe=control)
    spy.close()
    control.close()
    return spy


def test_unsupported_models_fall_back_to_one_forward():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, tok = tiny_moe("qwen3_moe")
    assert shared_prompt_supported(model)
    ddp_like = torch.nn.Module()
    ddp_like.module = model
    assert not shared_prompt_supported(ddp_like)
    # transformers >= 5.20 names it activation checkpointing, earlier versions gradient checkpointing
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_enable")()
    assert not shared_prompt_supported(model)
    getattr(model, f"{kind}_checkpointing_disable")()
    model.config._attn_implementation = "flash_attention_2"
    assert not shared_prompt_supported(model)
    sliding = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert not shared_prompt_supported(sliding)
    rollouts = mixed_rollouts(tok)
    batch = collate(rollouts, tok.pad_token_id)
    full, _ = token_logprobs(sliding, batch["input_ids"], batch["attention_mask"])
    again, _ = token_logprobs(sliding, batch["input_ids"], batch["attention_mask"], prompt_lens=batch["prompt_lens"])
    assert torch.equal(full, again)  # the full forward, prompt positions included


def test_advantages_are_kept_per_row():
    """Rows sharing a prompt keep their own completions and advantages (no mixing across rows)."""
    model, tok = tiny_moe("qwen3_moe")
    model = model.double()
    rollouts = mixed_rollouts(tok, seed=2)
    flipped = [replace(r, advantage=-r.advantage) if i == 2 else r for i, r in enumerate(rollouts)]
    _, grads_a, _ = _update(model, rollouts, tok, {}, shared=True)
    _, grads_b, _ = _update(model, flipped, tok, {}, shared=True)
    assert any(not torch.allclose(grads_a[n], grads_b[n]) for n in grads_a)


def test_r3_falls_back_to_one_forward_when_rows_disagree_on_a_prompt():
    """A sampler that routed a shared prompt differently per row (not the HF engine, which
    prefills it once): each row's own recording is replayed through the one-forward path."""
    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    record = rollouts[1].routed_experts.clone()
    record[0, 0] = (record[0, 0] + 1) % 8  # first prompt token, first layer: other experts
    record[0, 0, 1] = (record[0, 0, 0] + 1) % 8
    rollouts[1] = replace(rollouts[1], routed_experts=record)
    spy = r3_update(model, rollouts, tok)
    assert len(spy.calls) == 1  # one forward over prompt + completion rows
    ran = torch.stack(spy.calls[0], 1).view(len(rollouts), -1, 2, 2)  # [B, S, L, k]
    assert torch.equal(ran[1, 0], record[0].long())
