"""MoE: routing replay (R3 from the HF engine's recording, R2 from the old-logprob forward),
float32 routers, the load-balancing loss and the expert-load metrics, on tiny random MoE models
of four transformers families built from configs.

How the sampler/trainer mismatch is created on CPU: the sampler is a bfloat16 copy of the float32
trainer (as when vLLM samples in bf16 and the trainer trains in fp32), so some tokens' routers
pick other experts in the sampler than in the trainer's forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.algo.moe import RouterControl, find_routers, load_metrics, replay_from_rollouts
from grpo.config import MoEConfig, RunConfig
from grpo.model.tiny import build_char_tokenizer
from rollout.base import SamplingParams
from rollout.hf.engine import HFEngine


def tiny_moe(family: str, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    tok = build_char_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, head_dim=16, norm_topk_prob=True)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8)
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, num_experts=8)
    elif family in ("deepseek_v2", "deepseek_v3"):  # MLA; V2 never renormalises, V3 scores with a sigmoid
        from transformers import AutoConfig

        mla = dict(q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
        experts = dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, moe_intermediate_size=32)
        routing = (dict(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.5, n_group=1, topk_group=1)
                   if family == "deepseek_v2" else dict(norm_topk_prob=True, routed_scaling_factor=2.5, n_group=2,
                                                         topk_group=1))
        cfg = AutoConfig.for_model(family, **{**common, "num_key_value_heads": 4}, **mla, **experts, **routing)
    else:
        cfg = MixtralConfig(**common, num_local_experts=8)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    return model, tok


class ExpertsSpy:
    """Records the top-k indices the experts modules actually ran with, per forward call."""

    def __init__(self, model):
        self.calls: list[list[torch.Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for n, m in model.named_modules() if n.endswith("mlp.experts")]

    def _hook(self, module, args):
        if not self.calls or len(self.calls[-1]) == len(self.handles):
            self.calls.append([])
        self.calls[-1].append(args[1].detach().clone())  # top_k_index [T, k]

    def close(self):
        for h in self.handles:
            h.remove()


def perturbed_router_copy(model, scale: float = 0.1):
    """A float32 sampler whose routers' logits are off by a little (as from another kernel)."""
    sampler = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for router in find_routers(sampler):
            router.weight.add_(scale * router.weight.std() * torch.randn(router.weight.shape, generator=gen))
    return sampler


def sample_with_bf16_sampler(model, tok, n_prompts=4, group=4, seed=0, sampler=None):
    sampler = sampler if sampler is not None else copy.deepcopy(model).to(torch.bfloat16)
    engine = HFEngine(sampler, tok, "cpu")
    prompts = [tok.encode(f"User: {a}+{b}=? Assistant:", add_special_tokens=False) for a, b in [(12, 3), (7, 4), (45, 6), (3, 3)][:n_prompts]]
    rollouts = engine.generate(prompts, group, SamplingParams(max_new_tokens=12, prompt_seeds=tuple(range(n_prompts)),
                                                              record_routing=True, ignore_eos=True))
    gen = torch.Generator().manual_seed(seed)
    advantages = torch.randn(len(rollouts), generator=gen).tolist()
    from dataclasses import replace

    return [replace(r, advantage=a) for r, a in zip(rollouts, advantages)]


def training_forward(model, rollouts, tok, control, replay: bool):
    from grpo.algo.logprobs import token_logprobs
    from grpo.algo.update import collate

    batch = collate(rollouts, tok.pad_token_id)
    experts, valid = replay_from_rollouts(rollouts, batch["input_ids"].shape[1])
    spy = ExpertsSpy(model)
    with control.scope(batch["attention_mask"], experts if replay else None, valid if replay else None):
        logprobs, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    spy.close()
    ran = torch.stack(spy.calls[0], dim=1).view(*batch["input_ids"].shape, len(control.routers), -1)  # [B, S, L, k]
    return ran, experts, valid, logprobs, batch


FAMILIES = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_the_models_own_routing_changes_nothing(family):
    """Replay recomputes the chosen experts' weights by the family's own formula (softmax or
    sigmoid scores, renormalised or not, scaled or not): given the experts the same float32 model
    chose, the training forward must give the free forward's logprobs."""
    model, tok = tiny_moe(family)
    with torch.no_grad():  # make the DeepSeek-V3 score correction matter to the choice
        for router in find_routers(model):
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, router.num_experts))
    rollouts = sample_with_bf16_sampler(model, tok, sampler=model)  # the model itself samples
    control = RouterControl(model, MoEConfig(routing_replay="R3"))
    assert len(control.routers) == 2
    _, _, valid, replayed, batch = training_forward(model, rollouts, tok, control, replay=True)
    _, _, _, free, _ = training_forward(model, rollouts, tok, control, replay=False)
    mask = batch["attention_mask"][:, 1:].bool()
    assert valid.any()
    assert (replayed - free)[mask].abs().max().item() < 1e-5, family
    control.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"])
def test_r3_training_forward_runs_the_experts_the_engine_recorded(family):
    model, tok = tiny_moe(family)
    rollouts = sample_with_bf16_sampler(model, tok)
    control = RouterControl(model, MoEConfig(routing_replay="R3"))
    assert len(control.routers) == 2
    ran, experts, valid, _, _ = training_forward(model, rollouts, tok, control, replay=True)
    # every recorded token, every layer: the same set of k experts (order within top-k included)
    assert torch.equal(ran[valid], experts[valid])
    ran_free, *_ = training_forward(model, rollouts, tok, control, replay=False)
    differing = (ran_free[valid].sort(-1).values != experts[valid].sort(-1).values).any(-1).float().mean().item()
    print(f"{family}: without replay {differing:.1%} of (token, layer) routings differ from the bf16 sampler's")
    assert differing > 0, "the setup made no routing mismatch: the replay check would be vacuous"
    control.close()


def test_replay_keeps_router_gradients():
    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    control = RouterControl(model, MoEConfig(routing_replay="R3"))
    _, _, _, logprobs, batch = training_forward(model, rollouts, tok, control, replay=True)
    (logprobs * batch["mask"]).sum().backward()
    for router in control.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def mismatch_after_update(model, rollouts, tok, replay: str) -> dict:
    from grpo.algo.update import policy_update

    cfg = RunConfig.model_validate({"moe": {"routing_replay": replay}, "trainer": {"lr": 1e-6}})
    trainer_model = copy.deepcopy(model)
    control = RouterControl(trainer_model, cfg.moe)
    optimizer = torch.optim.AdamW(trainer_model.parameters(), lr=cfg.trainer.lr)
    metrics = policy_update(trainer_model, optimizer, rollouts, cfg, tok.pad_token_id, torch.device("cpu"), moe=control)
    control.close()
    return metrics


@pytest.mark.parametrize("sampler_kind", ["bf16", "perturbed_router"])
def test_r3_lowers_the_trainer_sampler_logprob_mismatch(sampler_kind):
    """Same rollouts, same trainer, replay off vs R3: `train/mismatch_abs` (mean |trainer -
    sampler| logprob over completion tokens) drops. bf16: most of the gap is bf16 arithmetic,
    which replay cannot remove; perturbed router (fp32, router weights + 10% noise): routing is
    the whole gap apart from the top-k weights."""
    model, tok = tiny_moe("qwen3_moe", layers=4)
    sampler = copy.deepcopy(model).to(torch.bfloat16) if sampler_kind == "bf16" else perturbed_router_copy(model)
    rollouts = sample_with_bf16_sampler(model, tok, seed=1, sampler=sampler)
    off = mismatch_after_update(model, rollouts, tok, "none")["train/mismatch_abs"]
    on = mismatch_after_update(model, rollouts, tok, "R3")["train/mismatch_abs"]
    print(f"{sampler_kind} sampler: train/mismatch_abs replay off {off:.6f}, R3 on {on:.6f}")
    assert on < off
    if sampler_kind == "perturbed_router":
        assert on < 0.5 * off


@pytest.mark.parametrize("shared", [True, False], ids=["shared_prompts", "full_forward"])
def test_r2_later_passes_use_the_old_forwards_experts(shared):
    from grpo.algo.update import policy_update

    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    routed = {}
    for replay in ("none", "R2"):
        cfg = RunConfig.model_validate({"moe": {"routing_replay": replay}, "algorithm": {"num_iterations": 2},
                                        "trainer": {"lr": 0.05, "shared_prompt_forward": shared}})
        m = copy.deepcopy(model)
        control = RouterControl(m, cfg.moe)
        spy = ExpertsSpy(m)
        policy_update(m, torch.optim.SGD(m.parameters(), lr=cfg.trainer.lr), rollouts, cfg, tok.pad_token_id,
                      torch.device("cpu"), moe=control)
        spy.close()
        # old-logprob pass, pass 1, pass 2: one forward each, or two with shared prompts (prompts, completions)
        per_pass = 2 if shared else 1
        assert len(spy.calls) == 3 * per_pass
        old, second = (torch.cat([torch.stack(c, 1) for c in calls]) for calls in
                       (spy.calls[:per_pass], spy.calls[2 * per_pass:]))
        routed[replay] = (old, second)
    old, second = routed["R2"]
    assert torch.equal(old, second)
    old, second = routed["none"]
    assert not torch.equal(old, second), "the update moved no routing: the R2 check would be vacuous"


def test_router_float32_in_a_bf16_model():
    model, tok = tiny_moe("qwen3_moe")
    model = model.to(torch.bfloat16)
    control = RouterControl(model, MoEConfig(router_float32=True))
    seen = []
    h = control.routers[0].register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    ids = torch.tensor([tok.encode("12+3=15", add_special_tokens=False)])
    model(input_ids=ids)
    h.remove()
    hidden, (logits, weights, indices) = seen[0]
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32
    expected = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), control.routers[0].weight.float())
    torch.testing.assert_close(logits, expected)
    assert torch.equal(indices, expected.softmax(-1).topk(2, dim=-1).indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))  # norm_topk_prob


def test_aux_loss_hand_computed_and_reaches_the_router():
    from grpo.algo.moe import RoutingScope

    model, _ = tiny_moe("qwen3_moe")
    control = RouterControl(model, MoEConfig(aux_loss_coef=0.01))
    control.num_experts = 4
    # 4 tokens, uniform probabilities (P_e = 1/4), each expert takes 2 of the 8 slots (f_e = 2/4):
    # E * sum_e f_e * P_e = 4 * 4 * (0.5 * 0.25) = 2 = top_k, the balanced value.
    scope = RoutingScope(None, logits=[torch.zeros(4, 4)], used=[torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])])
    assert control.aux_loss(scope).item() == pytest.approx(2.0)
    # all tokens on experts 0 and 1, probabilities still uniform: 4 * (1 * 0.25 + 1 * 0.25) = 2 as well,
    # but with probabilities following the routing (P = [.5, .5, 0, 0]): 4 * (1 * .5 + 1 * .5) = 4
    logits = torch.tensor([[10.0, 10.0, -30.0, -30.0]]).repeat(4, 1)
    scope = RoutingScope(None, logits=[logits], used=[torch.tensor([[0, 1]] * 4)])
    assert control.aux_loss(scope).item() == pytest.approx(4.0, rel=1e-4)


def test_aux_loss_of_a_sigmoid_router_uses_its_normalised_sigmoid_scores():
    """DeepSeek-V3 (e_score_correction_bias) scores experts with a sigmoid; its balance loss takes
    P_e from the scores normalised per token, s'_e = s_e / sum_j s_j (2412.19437, eq. 19), not a
    softmax of the logits. A softmax router keeps the softmax."""
    from grpo.algo.moe import RoutingScope

    # logits [ln 3, ln 3, 0, 0] for every token: sigmoid scores [.75, .75, .5, .5], sum 2.5, so
    # P = [.3, .3, .2, .2]; (softmax would give [3, 3, 1, 1] / 8 = [.375, .375, .125, .125]).
    # All 4 tokens on experts 0 and 1: f = [1, 1, 0, 0] (top_k = 2).
    logits = torch.tensor([[3.0, 3.0, 1.0, 1.0]]).log().repeat(4, 1)
    used = torch.tensor([[0, 1]] * 4)
    for family, expected in (("deepseek_v3", 4 * (1 * 0.3 + 1 * 0.3)),  # = 2.4
                             ("qwen3_moe", 4 * (1 * 0.375 + 1 * 0.375))):  # = 3.0
        model, _ = tiny_moe(family)
        control = RouterControl(model, MoEConfig(aux_loss_coef=0.01))
        control.num_experts = 4
        scope = RoutingScope(None, logits=[logits.clone()], used=[used])
        assert control.aux_loss(scope).item() == pytest.approx(expected, rel=1e-5), family
        control.close()


def test_aux_loss_coefficient_changes_router_gradients():
    from grpo.algo.update import policy_update

    model, tok = tiny_moe("qwen3_moe")
    rollouts = sample_with_bf16_sampler(model, tok)
    grads = {}
    for coef in (0.0, 1.0):
        cfg = RunConfig.model_validate({"moe": {"aux_loss_coef": coef}})
        m = copy.deepcopy(model)
        control = RouterControl(m, cfg.moe)
        metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.0), rollouts, cfg, tok.pad_token_id,
                                torch.device("cpu"), moe=control)
        grads[coef] = control.routers[0].weight.grad.clone()
        if coef:
            assert metrics["train/moe_aux_loss"] >= 2.0 - 1e-6  # >= top_k (its minimum at balance)
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_expert_load_metric_keys_and_values():
    counts = torch.tensor([[2.0, 2.0], [4.0, 0.0]])  # [layers, experts]
    m = load_metrics(counts)
    assert set(m) == {"moe/layer_0/expert_0/share", "moe/layer_0/expert_1/share", "moe/layer_0/entropy",
                      "moe/layer_0/max_share", "moe/layer_0/min_share", "moe/layer_1/expert_0/share",
                      "moe/layer_1/expert_1/share", "moe/layer_1/entropy", "moe/layer_1/max_share",
                      "moe/layer_1/min_share"}
    assert m["moe/layer_0/entropy"] == pytest.approx(1.0) and m["moe/layer_1/entropy"] == pytest.approx(0.0)
    assert m["moe/layer_1/max_share"] == 1.0 and m["moe/layer_1/min_share"] == 0.0
    assert m["moe/layer_0/expert_1/share"] == 0.5


def test_update_counts_only_attended_tokens_and_dense_models_are_untouched():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert find_routers(dense) == [] and not RouterControl(dense, MoEConfig()).is_moe
    model, tok = tiny_moe("qwen3_moe")
    control = RouterControl(model, MoEConfig())
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with control.scope(mask):
        model(input_ids=torch.tensor([[5, 6, 7, 0, 0]]), attention_mask=mask)
    counts = control.take_counts()
    assert counts.shape == (2, 8) and counts.sum(-1).tolist() == [6.0, 6.0]  # 3 tokens x top-2 per layer


def test_deepseek_v3_toy_routes_group_limited_and_r3_replays_it():
    """The DeepSeek-V3 toy (`grpo train RECIPE --toy`) routes as V3 does: 8 experts in 4 groups, a
    token's top-2 drawn from its best 2 groups (each scored by its two best bias-corrected sigmoid
    scores). The group limit must change some choices (else the check is vacuous), every recorded
    choice must lie in the token's best groups, and R3 must run exactly the recorded experts with
    the free forward's log-probs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo.commands.plan import KNOWN_ARCHS
    from grpo.commands.toy import build_byte_tokenizer, toy_config_kwargs

    tok = build_byte_tokenizer()
    kwargs = toy_config_kwargs(KNOWN_ARCHS["deepseek-ai/DeepSeek-V3-Base"], len(tok), tok.pad_token_id, tok.eos_token_id)
    assert (kwargs["n_routed_experts"], kwargs["n_group"], kwargs["topk_group"]) == (8, 4, 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **kwargs), dtype=torch.float32)
    with torch.no_grad():  # a correction bias that matters to the choice, as a trained one does
        for router in find_routers(model):
            router.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, router.num_experts))
    rollouts = sample_with_bf16_sampler(model, tok, sampler=model)  # the model itself samples
    control = RouterControl(model, MoEConfig(routing_replay="R3"))
    ran, experts, valid, replayed, batch = training_forward(model, rollouts, tok, control, replay=True)
    assert torch.equal(ran[valid], experts[valid])

    from grpo.algo.logprobs import token_logprobs

    with control.scope(batch["attention_mask"], keep_logits=True) as scope:
        free, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"][:, 1:].bool()
    assert (replayed - free)[mask].abs().max().item() < 1e-5
    router = control.routers[0]
    scores = scope.logits[0].sigmoid() + router.e_score_correction_bias  # [T, 8]
    groups = scores.view(-1, 4, 2).sum(-1)  # [T, 4]: two experts per group, both count
    allowed = torch.zeros_like(scores, dtype=torch.bool)  # [T, 8]
    allowed.view(-1, 4, 2)[torch.arange(len(groups))[:, None], groups.topk(2, dim=-1).indices] = True
    used = scope.used[0]  # [T, k]
    attended = batch["attention_mask"].reshape(-1).bool()
    assert allowed.gather(1, used)[attended].all()  # every choice inside the token's best 2 groups
    plain = scores.topk(2, dim=-1).indices  # [T, 2] without the group limit
    limited = (~allowed.gather(1, plain))[attended].any(-1).float().mean().item()
    print(f"group limit changed {limited:.0%} of the toy's token routings")
    assert limited > 0
    control.close()
