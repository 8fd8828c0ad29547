"""One step as a unit (grpo/run/step.py): `grpo train` and the step benchmark run the same function."""

from __future__ import annotations

import sys

import pytest

SHORT = ["trainer.threads=1", "trainer.prompts_per_step=2", "rollout.group_size=4", "eval.before_and_after=false",
         "logging.progress=false", "rewards.workers=0", "trainer.steps=2"]


def test_train_and_the_step_benchmark_call_the_same_step(tmp_path, monkeypatch, tiny_base):
    import grpo.run.step
    from bench.step_vs_trl import OurStep
    from grpo.cli import main

    real, callers = grpo.run.step.run_step, []

    def counted(ctx, step):
        callers.append(sys._getframe(1).f_code.co_filename)  # who called the step
        result = real(ctx, step)
        assert isinstance(result, grpo.run.step.StepResult) and result.step == step
        return result

    monkeypatch.setattr(grpo.run.step, "run_step", counted)
    assert main(["train", "recipes/tiny-cpu.yaml", *SHORT, "--output-dir", str(tmp_path / "run")]) == 0
    bench = OurStep(64, 2, prompts_per_step=2, group=4, new_tokens=8)
    split = [bench() for _ in range(3)]
    assert sum(f.endswith("grpo/run/train.py") for f in callers) == 2
    assert sum(f.endswith("bench/step_vs_trl.py") for f in callers) == 3
    assert len(callers) == 5
    assert all(s["step"] >= s["generate"] + s["train"] > 0 for s in split)
    # the logged rollouts carry the per-token view the dashboard draws, and each step its degenerate groups
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step-000002.jsonl").read_text().splitlines()]
    assert all(len(r["token_text"]) == len(r["token_logprobs"]) == r["num_tokens"] > 0 and r["prompt_tokens"] > 0
               for r in rows)
    assert all(lp <= 0 for r in rows for lp in r["token_logprobs"])
    # the trainer's view of the same tokens (colocated float32 engine: the same policy, so the same
    # log-probs up to arithmetic order; one position off would be far apart)
    for r in rows:
        assert len(r["token_trainer_logprobs"]) == len(r["token_entropy"]) == r["num_tokens"]
        assert max(abs(a - b) for a, b in zip(r["token_trainer_logprobs"], r["token_logprobs"])) < 1e-3
        assert all(e >= 0 for e in r["token_entropy"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["rollout/degenerate_groups_frac"] <= 1 for m in metrics)


def test_degenerate_groups_are_those_whose_rewards_are_all_equal():
    from grpo.run.step import degenerate_groups_frac
    from rollout.base import Rollout

    def ro(group, reward):
        return Rollout(group=group, prompt_ids=(1,), completion_ids=(2,), text="x", logprobs=(-0.1,),
                       finish_reason="stop", reward=reward)

    batch = [ro(0, 1.0), ro(0, 1.0), ro(1, 0.0), ro(1, 1.0), ro(2, 0.0), ro(2, 0.0), ro(3, 0.5), ro(3, 0.0)]
    assert degenerate_groups_frac(batch) == 0.5  # groups 0 (all solved) and 2 (all failed)


def test_each_step_logs_the_learning_rate_it_trained_with(tmp_path, tiny_base):
    """`train/lr` is the rate of that step's update: warm-up, then the decay of `trainer.lr_schedule`."""
    import json

    from grpo.cli import main
    from grpo.config import TrainerConfig
    from grpo.model.optim import lr_factor

    out = tmp_path / "run"
    sched = ["trainer.lr=1e-3", "trainer.warmup_steps=1", "trainer.lr_schedule=cosine", "trainer.min_lr_ratio=0.1"]
    assert main(["train", "recipes/tiny-cpu.yaml", *SHORT, "trainer.steps=4", *sched, "--output-dir", str(out)]) == 0
    logged = [json.loads(line)["train/lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    tr = TrainerConfig(steps=4, lr=1e-3, warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.1)
    assert logged == pytest.approx([1e-3 * lr_factor(s, tr) for s in range(4)])
    assert logged[0] == pytest.approx(5e-4) and logged[1] == pytest.approx(1e-3)  # half-way up, then the peak
    assert logged[1] > logged[2] > logged[3] > 1e-4  # decaying towards lr * min_lr_ratio, not there yet


def test_prompt_groups_carry_row_text_ids_seed_and_global_index(tiny_base):
    """A PromptGroup holds everything the step needs about its prompt, encoded once; a rank's
    groups are numbered from its first global prompt index and seeded by that index."""
    from grpo.collectives import group_seed
    from grpo.config import RunConfig
    from grpo.model.tiny import build_char_tokenizer
    from grpo.run.sampling import SamplingContext, prompt_groups

    cfg = RunConfig.model_validate({"trainer": {"seed": 7, "prompts_per_step": 4}})
    tok = build_char_tokenizer()

    ctx = SamplingContext(cfg, None, None, tok, None, batch=slice(2, 4))
    rows = [{"question": "1+2", "answer": "3"}, {"question": "4+5", "answer": "9"}]
    groups = prompt_groups(ctx, rows, step=3, sampling_round=1)
    assert [g.index for g in groups] == [2, 3]
    assert [g.seed for g in groups] == [group_seed(7, 3, 2, 1), group_seed(7, 3, 3, 1)]
    for g, row in zip(groups, rows):
        assert g.row is row and "1+2" in groups[0].text
        assert list(g.token_ids) == tok.encode(g.text, add_special_tokens=False)


@pytest.mark.parametrize("rewards,correct,expected", [
    ({"countdown": 1.0, "format": 1.0}, ["countdown", "format"], True),
    ({"countdown": 1.0, "format": 0.0}, ["countdown", "format"], False),
    ({"math_answer": 1.0}, ["math_answer", "format"], False),  # a reward it did not score is not 1.0
    ({"math_answer": None, "format": 1.0}, ["math_answer", "format"], False),  # "does not apply" is not correct
])
def test_one_definition_of_correct(rewards, correct, expected):
    """Training's rollout/accuracy and evaluation both ask `is_correct` with `eval.correct`."""
    from rewards import is_correct

    assert is_correct(rewards, correct) is expected


def test_training_scores_what_eval_correct_names_at_weight_zero():
    """A countdown recipe's rollout/accuracy counts countdown answers (it once hard-coded math_answer);
    a correctness reward the recipe does not train on is scored with weight 0."""
    from grpo.config import load_recipe
    from grpo.run.sampling import make_scorer

    cfg = load_recipe("recipes/countdown-tiny-cpu.yaml", ["rewards.workers=0"])
    assert set(cfg.eval.correct) <= {f.name for f in cfg.rewards.functions}
    cfg = load_recipe("recipes/tiny-cpu.yaml", ["rewards.workers=0", "eval.correct=[math_answer,format,countdown]"])
    scorer = make_scorer(cfg)
    try:
        result = scorer.score(["<think>x</think><answer>3</answer>"], [{"answer": "3", "numbers": [1, 2], "target": 3}])
        assert "countdown" in result.per_function
        weights = {s.name: s.weight for s in scorer.specs}
        assert weights["countdown"] == 0.0
    finally:
        scorer.close()


def test_the_reference_becomes_the_policy_at_the_refresh_interval_and_not_before():
    """algorithm.ref_refresh_steps=3: after the updates of steps 1 and 2 the reference is still the
    initial policy; after step 3 it holds the policy's weights of that moment, and keeps them while
    the policy moves on (steps 4, 5) until step 6."""
    import copy
    from types import SimpleNamespace

    import torch

    from grpo.config import RunConfig
    from grpo.run.step import refresh_reference
    from tests.grpo.algo.test_logprobs import tiny_moe

    model = tiny_moe()
    ref = copy.deepcopy(model).requires_grad_(False)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = RunConfig.model_validate({"algorithm": {"beta": 0.04, "ref_refresh_steps": 3}})
    ctx = SimpleNamespace(cfg=cfg, model=model, ref_model=ref)

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    snapshots = {}
    for step in range(1, 7):
        with torch.no_grad():  # an update
            for p in model.parameters():
                p.add_(0.01)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        refreshed = refresh_reference(ctx, step)
        assert refreshed == (step % 3 == 0), step
        held = ref.state_dict()
        if step < 3:
            assert same(held, initial), step
        else:
            assert same(held, snapshots[3 if step < 6 else 6]), step
            assert not same(held, initial)
    assert not ref.training or all(not p.requires_grad for p in ref.parameters())  # still frozen
