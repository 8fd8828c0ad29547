"""Invariants of the policy update (grpo/algo/update.py) on a tiny real Qwen3-MoE, in float64:

- the same parameter update whether a global batch of 8 sequences runs as 1x8, 2x4 or 8x1
  micro-batches with gradient accumulation;
- on policy (one pass, ratio 1) the gradient is the REINFORCE-with-group-baseline gradient;
- with several passes the old log-probs are computed once.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import grpo.algo.update
from grpo.algo.advantages import group_advantages
from grpo.algo.logprobs import token_logprobs_plain
from grpo.algo.update import collate, policy_update
from grpo.config import RunConfig
from rollout.base import Rollout
from tests.grpo.algo.test_logprobs import VOCAB, tiny_moe

CPU = torch.device("cpu")
G = 4  # group size: 8 sequences are 2 groups of 4


pytestmark = pytest.mark.usefixtures("one_thread")


def rollouts(scale: str = "group") -> list[Rollout]:
    """8 rollouts with prompts of 2-5 tokens, completions of 1-8 tokens (two truncated at 8)."""
    g = torch.Generator().manual_seed(3)
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.2]])  # [2, G]
    adv = group_advantages(rewards, scale).flatten().tolist()  # [8]
    out = []
    for i in range(8):
        prompt_len = 2 + i % 4
        completion_len = [3, 8, 1, 5, 8, 2, 6, 4][i]
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=g).tolist()
        completion = torch.randint(1, VOCAB, (completion_len,), generator=g).tolist()
        out.append(Rollout(group=i // G, prompt_ids=tuple(prompt), completion_ids=tuple(completion), text="",
                           logprobs=(0.0,) * completion_len, finish_reason="length" if completion_len == 8 else "stop",
                           reward=rewards.flatten()[i].item(), advantage=adv[i]))
    # sampler log-probs: the policy's own, off by up to +-0.8 (ratios in [0.45, 2.2]: some get masked)
    b = collate(out, pad_id=0)
    with torch.no_grad():
        true = token_logprobs_plain(tiny_moe(), b["input_ids"], b["attention_mask"])  # [8, S-1]
    noisy = true + 1.6 * (torch.rand(true.shape, generator=g, dtype=true.dtype) - 0.5)  # [8, S-1]
    return [replace(r, logprobs=tuple(noisy[i][b["mask"][i] > 0].tolist())) for i, r in enumerate(out)]


def config(micro_batch: int, **algorithm) -> RunConfig:
    return RunConfig.model_validate({
        "rollout": {"group_size": G, "max_new_tokens": 8, "temperature": 1.0},
        "algorithm": algorithm,
        "trainer": {"micro_batch_size": micro_batch, "max_grad_norm": 1e9},
    })


def updated(micro_batch: int, lr: float = 0.5, **algorithm) -> tuple[list[torch.Tensor], dict[str, float]]:
    model = tiny_moe()
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not zero
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    metrics = policy_update(model, optimizer, rollouts(), config(micro_batch, **algorithm), pad_id=0, device=CPU,
                            ref_model=ref)
    return [p.detach().clone() for p in model.parameters()], metrics


ALGORITHMS = {
    "token_mean": {"loss_agg": "token_mean"},
    "token_mean_2_passes_tis": {"loss_agg": "token_mean", "num_iterations": 2, "sampler_correction": "tis",
                                "clip_high": 0.28},
    "dapo_overlong_filter": {"preset": "dapo", "overlong_filter": True, "num_iterations": 2},
    "grpo_kl": {"preset": "grpo", "beta": 0.5},
    "dr_grpo_icepop": {"preset": "dr_grpo", "sampler_correction": "icepop"},
    "gspo_mis": {"preset": "gspo", "sampler_correction": "mis", "num_iterations": 2},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_update_is_invariant_to_micro_batching(name):
    full, metrics = updated(8, **ALGORITHMS[name])
    initial = [p.detach() for p in tiny_moe().parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(full, initial))
    assert moved > 1e-4, "the update must move the parameters, or the comparison proves nothing"
    for micro_batch in (4, 1):
        split, split_metrics = updated(micro_batch, **ALGORITHMS[name])
        for a, b in zip(full, split):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # float64: far inside the 1e-6 asked for
        assert split_metrics["train/loss"] == pytest.approx(metrics["train/loss"], abs=1e-9)


def test_on_policy_gradient_is_reinforce_with_group_baseline():
    """One pass, ratio 1: grad = -(1/N_tokens) sum_i (r_i - mean_group r) sum_t grad log pi(y_it)."""
    batch = rollouts(scale="none")  # A_i = r_i - group mean
    model = tiny_moe()
    policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, config(3, advantage_scale="none"),
                  pad_id=0, device=CPU)  # micro-batches of 3, 3, 2 with accumulation
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    b = collate(batch, pad_id=0)
    logprobs = token_logprobs_plain(model, b["input_ids"], b["attention_mask"])  # [8, S-1]
    rewards = torch.tensor([r.reward for r in batch]).view(2, G)  # [2, G]
    baseline = rewards.mean(dim=1, keepdim=True).expand(2, G).flatten()  # [8]
    reinforce = -((rewards.flatten() - baseline).unsqueeze(-1) * logprobs * b["mask"]).sum() / b["mask"].sum()
    reinforce.backward()
    assert max(g.abs().max().item() for g in got) > 1e-6
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


def test_old_logprobs_are_computed_once(monkeypatch):
    calls = {"no_grad": 0, "grad": 0}
    real = grpo.algo.update.micro_batch_logprobs  # every micro-batch forward, packed or padded

    def counting(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo.algo.update, "micro_batch_logprobs", counting)
    _, metrics = updated(4, lr=2.0, num_iterations=3, clip_low=0.01, clip_high=0.01)
    assert calls == {"no_grad": 2, "grad": 6}  # old log-probs: once per micro-batch; 3 passes x 2 micro-batches
    # later passes see ratios away from 1 (the old log-probs stayed fixed), so some tokens clip
    assert metrics["train/clip_frac_low"] + metrics["train/clip_frac_high"] > 0
    assert metrics["train/approx_kl_old"] > 0


def test_overlong_filter_masks_truncated_completions():
    batch = rollouts()
    plain, filtered = collate(batch, 0), collate(batch, 0, overlong_filter=True)
    lengths = [r.num_completion_tokens for r in batch]  # rows 1 and 4 are truncated at 8 tokens
    assert plain["mask"].sum(-1).tolist() == lengths
    assert filtered["mask"].sum(-1).tolist() == [0 if n == 8 else n for n in lengths]


def test_reference_model_needed_only_with_beta():
    model = tiny_moe()
    with pytest.raises(ValueError, match="reference"):
        policy_update(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts(), config(8, beta=0.1),
                      pad_id=0, device=CPU)
    metrics = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts(), config(8), pad_id=0,
                            device=CPU)  # beta 0: no reference anywhere
    assert "train/kl" not in metrics


@pytest.mark.parametrize("passes", [1, 2])
def test_mini_batches_equal_optimizer_steps_done_by_hand(passes):
    """algorithm.mini_batches=2 on 2 groups: one optimizer step per group, by hand here. The old
    log-probs (and the reference's) are taken once from the policy before the first step; each
    step's loss is normalised by its own mini-batch (token mean over its 4 sequences); the sampler
    log-probs stay the behaviour policy of the TIS correction in both. Micro-batches of 3 inside
    each mini-batch of 4 (3 + 1, accumulated) must not matter."""
    from grpo.algo.loss import objective_from_config

    algorithm = {"preset": "grpo", "beta": 0.5, "loss_agg": "token_mean", "sampler_correction": "tis",
                 "mini_batches": 2, "num_iterations": passes}
    got, metrics = updated(3, **algorithm)

    batch, cfg = rollouts(), config(8, **algorithm)
    model = tiny_moe()
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # the same reference as `updated` builds
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn, normalizer_of = objective_from_config(cfg.algorithm)
    b = collate(batch, pad_id=0)
    with torch.no_grad():
        old = token_logprobs_plain(model, b["input_ids"], b["attention_mask"])  # [8, S-1], before any step
        ref_lp = token_logprobs_plain(ref, b["input_ids"], b["attention_mask"])  # [8, S-1]
    for _ in range(passes):
        for half in (slice(0, 4), slice(4, 8)):  # group 0, then group 1
            optimizer.zero_grad()
            logprobs = token_logprobs_plain(model, b["input_ids"][half], b["attention_mask"][half])  # [4, S-1]
            mask = b["mask"][half]  # [4, S-1]
            # token mean over this mini-batch only: sum over its tokens / its own token count
            loss, _ = loss_fn(logprobs, old[half], b["advantages"][half], mask, normalizer=mask.sum().item(),
                              sampler_logprobs=b["sampler_logprobs"][half], ref_logprobs=ref_lp[half])
            loss.backward()
            optimizer.step()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-9)

    whole, _ = updated(3, **{**algorithm, "mini_batches": 1})  # one step on the whole batch is another update
    assert max((a - w).abs().max().item() for a, w in zip(got, whole)) > 1e-4
    assert metrics["train/approx_kl_old"] > 0  # the second step's ratios are taken against the old policy


def test_mini_batches_step_the_schedule_once_per_optimizer_step():
    """trainer.steps counts generation batches, the schedule optimizer steps: 2 mini-batches x 2
    passes = 4 optimizer steps per batch, and the warm-up of 1 step lasts 4 of them."""
    from grpo.model.optim import lr_factor, make_schedule

    cfg = config(8, mini_batches=2, num_iterations=2)
    cfg.trainer.warmup_steps, cfg.trainer.steps, cfg.trainer.lr_schedule = 1, 2, "linear"
    model = tiny_moe()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = make_schedule(optimizer, cfg.trainer, grpo.algo.update.optimizer_steps_per_batch(cfg.algorithm))
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    policy_update(model, optimizer, rollouts(), cfg, pad_id=0, device=CPU, schedule=schedule)
    # warm-up over 1 x 4 optimizer steps: (s + 1) / (4 + 1)
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert schedule.last_epoch == 4
    # then linear decay over the other 4: 1 - (s - 4) / 4 for s = 4..7
    assert [lr_factor(s, cfg.trainer, 4) for s in range(4, 8)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_mini_batches_deal_the_outputs_of_fewer_groups_by_hand():
    """algorithm.mini_batches=4 on 2 groups of 4 (fewer groups than mini-batches, as with one prompt
    per trainer process): output j of each group goes to mini-batch j, so the 4 optimizer steps
    train rows (0, 4), (1, 5), (2, 6), (3, 7), each with the advantages of its whole group, its own
    token-mean normaliser, and the old log-probs from before the first step; by hand here."""
    from grpo.algo.loss import objective_from_config

    algorithm = {"preset": "grpo", "beta": 0.0, "loss_agg": "token_mean", "sampler_correction": "tis",
                 "mini_batches": 4}
    got, _ = updated(1, **algorithm)

    batch, cfg = rollouts(), config(8, **algorithm)
    model = tiny_moe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn, _ = objective_from_config(cfg.algorithm)
    b = collate(batch, pad_id=0)
    with torch.no_grad():
        old = token_logprobs_plain(model, b["input_ids"], b["attention_mask"])  # [8, S-1], before any step
    for rows in ([0, 4], [1, 5], [2, 6], [3, 7]):
        rows = torch.tensor(rows)
        optimizer.zero_grad()
        logprobs = token_logprobs_plain(model, b["input_ids"][rows], b["attention_mask"][rows])  # [2, S-1]
        mask = b["mask"][rows]  # [2, S-1]
        loss, _ = loss_fn(logprobs, old[rows], b["advantages"][rows], mask, normalizer=mask.sum().item(),
                          sampler_logprobs=b["sampler_logprobs"][rows])
        loss.backward()
        optimizer.step()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-9)
    by_groups, _ = updated(1, **{**algorithm, "mini_batches": 2})  # whole groups: another update
    assert max((a - w).abs().max().item() for a, w in zip(got, by_groups)) > 1e-4


def test_check_supported_deals_one_group_over_the_mini_batches():
    """512 prompts over 512 processes in 16 mini-batches (R1-Zero): each process deals its one
    group of 16 outputs; a group of 8 cannot fill 16 mini-batches, and 3 groups per process
    cannot be cut into 2 runs of whole groups alike on every process."""
    from grpo.run.processes import UnsupportedError, check_supported

    def cfg(prompts, parts, size):
        return RunConfig.model_validate({"rollout": {"group_size": size}, "algorithm": {"mini_batches": parts},
                                         "trainer": {"prompts_per_step": prompts}})

    check_supported(cfg(512, 16, 16), 512)
    check_supported(cfg(1024, 16, 16), 512)  # 2 groups per process, dealt over 16
    check_supported(cfg(64, 16, 16), 2)  # 32 groups per process: runs of 2 whole groups
    with pytest.raises(UnsupportedError, match="rollout.group_size=8"):
        check_supported(cfg(512, 16, 8), 512)
    with pytest.raises(UnsupportedError, match="must divide"):
        check_supported(cfg(6, 2, 4), 2)
