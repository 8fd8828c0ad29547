"""Algorithm presets (grpo/config.py): each expands to its documented settings, explicit fields win,
the resolved config shows every field, and validation stays strict."""

from __future__ import annotations

import pytest
import yaml

from grpo.config import PRESETS, AlgorithmConfig, ConfigError, RunConfig, dump_config, load_recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_expands_to_its_settings(name):
    for spelled in ({"algorithm": name}, {"algorithm": {"preset": name}}):
        algo = RunConfig.model_validate(spelled).algorithm
        assert algo.preset == name
        for key, value in PRESETS[name].items():
            assert getattr(algo, key) == value, key


def test_documented_values():
    assert AlgorithmConfig(preset="dapo").clip_high == 0.28 and AlgorithmConfig(preset="dapo").dynamic_sampling
    assert AlgorithmConfig(preset="dr_grpo").loss_agg == "seq_sum"
    assert AlgorithmConfig(preset="dr_grpo").advantage_scale == "none"
    assert AlgorithmConfig(preset="gspo").ratio_level == "sequence"
    assert (AlgorithmConfig(preset="gspo").clip_low, AlgorithmConfig(preset="gspo").clip_high) == (3e-4, 4e-4)
    assert AlgorithmConfig(preset="grpo").beta == 0.04 and AlgorithmConfig(preset="grpo").loss_agg == "seq_mean"


def test_explicit_fields_override_the_preset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  preset: dapo\n  clip_high: 0.3\n")
    cfg = load_recipe(recipe, ["algorithm.dynamic_sampling=false"])
    assert cfg.algorithm.clip_high == 0.3 and not cfg.algorithm.dynamic_sampling
    assert cfg.algorithm.loss_agg == "token_mean"  # still the preset's
    cfg = load_recipe(recipe, ["algorithm.preset=dr_grpo"])  # preset from the command line, recipe field kept
    assert cfg.algorithm.loss_agg == "seq_sum" and cfg.algorithm.clip_high == 0.3


def test_resolved_config_shows_every_field_and_round_trips(tmp_path):
    cfg = RunConfig.model_validate({"algorithm": "dapo"})
    dumped = yaml.safe_load(dump_config(cfg))["algorithm"]
    assert set(dumped) == set(AlgorithmConfig.model_fields)
    assert dumped["clip_high"] == 0.28 and dumped["overlong_buffer"] == 0.2
    again = tmp_path / "config.yaml"
    again.write_text(dump_config(cfg))
    assert load_recipe(again).algorithm == cfg.algorithm


def test_validation_stays_strict(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  preset: dapo\n  clip_hi: 0.3\n")
    with pytest.raises(ConfigError, match="algorithm.clip_hi: unknown key"):
        load_recipe(recipe)
    recipe.write_text("algorithm: ppo\n")
    with pytest.raises(ConfigError, match="algorithm.preset"):
        load_recipe(recipe)
    recipe.write_text("algorithm: {preset: dapo}\n")
    with pytest.raises(ConfigError, match="algorithm.dual_clip: Input should be greater than 1"):
        load_recipe(recipe, ["algorithm.dual_clip=0.5"])
