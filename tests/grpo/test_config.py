"""Recipe validation: every kind of bad recipe is one clear line, exit status 2, nothing written."""

from __future__ import annotations

import pytest

from grpo.cli import main
from grpo.config import ConfigError, RunConfig, dump_config, load_recipe
from tests.conftest import ROOT

ROOT = ROOT
GOOD = (ROOT / "recipes" / "tiny-cpu.yaml").read_text()

# (name, recipe text or None for "file missing", overrides, fragments the one-line message must contain)
BAD_RECIPES = [
    ("unknown section", GOOD + "\ntrainr: {steps: 3}\n", [], ["trainr", "unknown key"]),
    ("unknown nested key", GOOD.replace("  steps: 60", "  stepz: 60"), [], ["trainer.stepz", "unknown key"]),
    ("wrong type", GOOD.replace("  steps: 60", "  steps: many"), [], ["trainer.steps", "integer", "'many'"]),
    ("negative batch size", GOOD.replace("prompts_per_step: 8", "prompts_per_step: -4"), [],
     ["trainer.prompts_per_step", "greater than or equal to 1", "-4"]),
    ("group size 1", GOOD.replace("group_size: 8", "group_size: 1"), [], ["rollout.group_size", "2"]),
    ("malformed YAML", "model:\n  name_or_path: [unclosed\n", [], ["malformed YAML", "line"]),
    ("empty file", "", [], ["empty"]),
    ("not a mapping", "- just\n- a list\n", [], ["mapping", "list"]),
    ("missing file", None, [], ["not found"]),
    ("bad literal", GOOD.replace("loss_agg: token_mean", "loss_agg: token_sum"), [], ["algorithm.loss_agg", "token_sum"]),
    ("unknown override key", GOOD, ["trainer.nope=3"], ["trainer.nope", "unknown key"]),
    ("override without =", GOOD, ["trainer.steps"], ["key=value"]),
    ("inconsistent clips", GOOD.replace("clip_high: 0.28", "clip_high: 0.1"), [], ["clip_high", "clip_low"]),
    ("unknown tracker", GOOD + "\n", ["logging.report_to=[wandb, neptune]"], ["report_to", "neptune"]),
]


@pytest.mark.parametrize("name,text,overrides,fragments", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_is_one_clear_line_exit_2_and_nothing_written(tmp_path, capsys, name, text, overrides, fragments):
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    out = tmp_path / "run"
    status = main(["train", str(recipe), *overrides, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1, err
    assert str(recipe) in err or "override" in err, err  # names the file (or the override)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_reward_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import grpo.run.train

    def no_model(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a model was loaded before the reward names were checked")

    monkeypatch.setattr(grpo.run.train, "load_policy", no_model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace("name: format,", "name: no_such_reward,"))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no_such_reward" in err and "math_answer" in err  # lists the names it knows
    assert not out.exists() or not any(out.iterdir())


def test_non_empty_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["train", str(ROOT / "recipes" / "tiny-cpu.yaml"), "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_overrides_are_typed_and_validated():
    cfg = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["trainer.steps=7", "rollout.temperature=0.5",
                                                           "rewards.functions.1.weight=0.25"])
    assert cfg.trainer.steps == 7 and cfg.rollout.temperature == 0.5
    assert cfg.rewards.functions[1].weight == 0.25
    with pytest.raises(ConfigError, match="trainer.steps"):
        load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["trainer.steps=0"])


def test_resolved_config_round_trips_with_every_field():
    cfg = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")
    import yaml

    dumped = yaml.safe_load(dump_config(cfg))
    assert RunConfig.model_validate(dumped) == cfg
    assert dumped["trainer"]["max_grad_norm"] == cfg.trainer.max_grad_norm  # defaults are written out too


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, RunConfig.__mro__[1]):
                walk(annotation)
            elif model is not RunConfig:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(RunConfig)


def test_math_answer_conventions_are_strict_by_default_written_down_and_reach_the_reward(tmp_path):
    from grpo.run.evaluate import make_eval_scorer
    from grpo.run.sampling import make_scorer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    cfg = load_recipe(recipe)
    assert cfg.rewards.math_answer.model_dump() == {"rounded_decimals": False, "unmarked": "reject",
                                                   "unterminated_box": False}
    assert "math_answer:\n    rounded_decimals: false\n    unmarked: reject" in dump_config(cfg)  # the run's config.yaml
    cfg = load_recipe(recipe, ["rewards.math_answer.rounded_decimals=true", "rewards.workers=0"])
    for scorer in (make_scorer(cfg), make_eval_scorer(cfg)):
        with scorer:
            spec = next(s for s in scorer.specs if s.name == "math_answer")
            assert spec.kwargs["rounded_decimals"] is True and spec.kwargs["unmarked"] == "reject"
            assert scorer.score(["<answer>3.14</answer>"], [{"answer": "\\pi"}]).per_function["math_answer"] == [1.0]
    with pytest.raises(ConfigError, match="rewards.math_answer.unmarked"):
        load_recipe(recipe, ["rewards.math_answer.unmarked=guess"])
