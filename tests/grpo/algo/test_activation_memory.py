"""trainer.gradient_checkpointing and trainer.activation_offload change where activations live,
not the update: on a tiny Qwen3-MoE in float64 the parameters after `policy_update` equal the
plain ones, with each option and with both, also with routing replay (R2) over two mini-batches,
whose recomputed forwards must route as the forward did."""

from __future__ import annotations

import pytest
import torch

from grpo.algo.moe import RouterControl
from grpo.algo.update import policy_update
from grpo.config import RunConfig
from tests.grpo.algo.test_logprobs import tiny_moe
from tests.grpo.algo.test_update_invariance import G, rollouts

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(checkpointing: bool, offload: bool, replay: str) -> tuple[list[torch.Tensor], int]:
    """(parameters after one update, forwards the first decoder layer ran)."""
    cfg = RunConfig.model_validate({
        "rollout": {"group_size": G, "max_new_tokens": 8, "temperature": 1.0},
        "algorithm": {"preset": "grpo", "beta": 0.0, "mini_batches": 2, "num_iterations": 2, "sampler_correction": "tis"},
        "trainer": {"micro_batch_size": 3, "max_grad_norm": 1e9, "shared_prompt_forward": False,
                    "gradient_checkpointing": checkpointing,
                    "activation_offload": offload},
        "moe": {"routing_replay": replay, "aux_loss_coef": 0.01},
    })
    model = tiny_moe().eval()  # the trainer's policy is in eval mode (from_pretrained)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    control = RouterControl(model, cfg.moe)
    policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), rollouts(), cfg, pad_id=0,
                  device=torch.device("cpu"), moe=control)
    control.close()
    assert not any(m.training for m in model.modules())  # back in eval mode afterwards
    return [p.detach().clone() for p in model.parameters()], sum(calls)


@pytest.mark.parametrize("replay", ["none", "R2"])
def test_checkpointing_and_offload_leave_the_update_unchanged(replay):
    plain, forwards = trained(False, False, replay)
    assert forwards == 8  # 2 passes x 2 mini-batches x 2 micro-batches (3 + 1 sequences)
    initial = [p.detach() for p in tiny_moe().parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(plain, initial)) > 1e-4
    for checkpointing, offload in [(True, False), (False, True), (True, True)]:
        got, grad_forwards = trained(checkpointing, offload, replay)
        for a, b in zip(plain, got):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        assert grad_forwards == (16 if checkpointing else 8)  # checkpointing recomputes each forward once
