"""One full GRPO step of grpo-zero vs TRL's GRPOTrainer on identical work, in the same run.

CPU (what `make bench` runs):
    python bench/step_vs_trl.py                 # both sizes, one JSON line each
    python bench/step_vs_trl.py --size tiny     # hidden 128, 4 layers
    python bench/step_vs_trl.py --size small    # hidden 512, 8 layers
    python bench/step_vs_trl.py --size small --lengths spread   # long-tailed completion lengths
    python bench/step_vs_trl.py --size small --memory           # trainer peak memory, packed vs padded
GPU: not meant for one (it compares CPU step times; see bench/gpu_check.sh for the GPU check).

The work, identical on both sides:
- the same random-init Qwen3-MoE built locally from a config (hidden 128, 4 layers, 4 heads /
  2 KV heads, 8 experts, top-2, expert width 128, router logits on, float32; or the `small` size:
  hidden 512, 8 layers), the same initial weights (same seed), and the character-level tokenizer
  of `grpo.model.tiny` (no download);
- 2 prompts x 8 completions per step from the arithmetic task's R1-Zero prompt template, exactly
  32 new tokens each (EOS suppressed: our `ignore_eos`, TRL's `min_new_tokens=32`), temperature 1,
  no top-k / top-p (`--lengths fixed`, the default);
- or (`--lengths spread`) completion lengths drawn per step from a log-normal distribution,
  median SPREAD_MEDIAN tokens, sigma SPREAD_SIGMA, clipped to [SPREAD_MIN, SPREAD_MAX], the same
  16 lengths for step k on both sides (seeded by k) and forced the same way on both: EOS
  suppressed until the drawn length, then EOS forced (our engine's draw and a transformers
  LogitsProcessor on TRL's `generate`, both outside the models). Why log-normal: reasoning-RL
  response lengths are right-skewed with a long tail, most short and a few many times the median
  (the R1-Zero, DAPO and Open-Reasoner-Zero length histograms); a log-normal with sigma 0.8 puts
  the longest of a 16-completion step at about 4 times the median and 3 times the mean, the
  padding share such a step has. The scale is shrunk to what 2 CPU cores run (the waste of a
  padded batch depends on the ratio of lengths, not their scale);
- the same rewards, computed by the project's own `Scorer` (math_answer + 0.5 * format,
  in-process) on both sides;
- GRPO with group-std advantages, beta 0 (no reference model), one pass per batch
  (num_iterations 1), clip 0.2, token-mean loss over the batch (TRL's `loss_type="dapo"`),
  AdamW at lr 1e-5 with betas (0.9, 0.999) (TRL's default scheduler decays it linearly;
  irrelevant to speed), gradient clip 1.0, float32, 2 torch threads.

Our side is what `grpo train` runs with its defaults on CPU: per-group sampling seeds, the HF
engine's fast decode path with one prefill per distinct prompt, the `grpo_sorted` experts kernel
for training (`grpo.model.experts`), shared-prompt training forwards (`trainer.shared_prompt_forward`),
the MoE router hooks with expert-load metrics, and the fused AdamW of `grpo.model.optim.make_optimizer`.
Where our speed comes from, measured on this 2-core machine: generation avoids `generate`'s
per-token overhead and prefills each prompt once instead of 8 times; training runs each prompt
once instead of 8 times (this benchmark's prompts are ~58 tokens against 32 completion tokens,
so that is worth more here than in runs with long completions) and spends fewer operations per
MoE layer.

Fairness notes for TRL's side (each choice makes TRL's side faster or equal, never slower):
- no vLLM; generation by transformers' `model.generate` as TRL does it on CPU;
- gradient checkpointing off (TRL's GRPOConfig default is on, which FACTS.md measured ~10% slower
  on this model);
- `router_aux_loss_coef=0`: TRL would otherwise add the MoE load-balancing loss; grpo-zero's RL
  update has no aux loss by default, so neither side does. TRL's model copy has router logits off,
  since transformers 5.24's `generate` fails with them on (see `run`); ours keeps them on in its
  config (the trainer calls the decoder and applies the head itself, so no aux loss is computed);
- TRL's model uses the experts kernel given by `--trl-experts` (default: transformers' own default
  for the device).

Timing: TRL's `train()` runs the loop; after each of its optimizer steps a callback runs one step of
ours, so the two alternate step by step under the same machine load. A TRL step is the wall time
between consecutive callbacks minus the time spent in our step; ours is `grpo.run.step.run_step` (draw
prompts -> encode -> generate -> score -> advantages -> update -> weight sync), the function
`grpo train` calls for every step, and its split is the step's own `time/*` metrics.
The first 3 steps of each are warm-up (2 with spread lengths); medians of the next 30 (16) are reported,
with the 1-minute load average (other processes on a shared machine inflate both sides).

TRL's best settings for the spread mix, as far as TRL 1.16 has them on CPU: GRPOConfig has no
padding-free option (only its experimental asynchronous trainer packs, with a flash-attention-3
kernel, GPU only), and its continuous-batching generation (`use_transformers_paged`) cannot take
the length-forcing logits processor; so it runs as above, padding each step's batch to its
longest completion. Ours runs its defaults: padding-free micro-batches
(`trainer.max_tokens_per_micro_batch`) and a decode loop that drops finished rows.

`--memory`: trainer peak memory of one policy update (forward + backward) on a spread batch
(8 prompts x 8 completions, lengths from the same distribution scaled up MEMORY_SCALE times so activations
dominate), packed against right-padded, each in its own process (peak RSS, `ru_maxrss`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SIZES = {"tiny": (128, 4), "small": (512, 8)}
PROMPTS_PER_STEP, GROUP, NEW_TOKENS, LR = 2, 8, 32, 1e-5
SPREAD_MEDIAN, SPREAD_SIGMA, SPREAD_MIN, SPREAD_MAX = 24, 0.8, 4, 192
MEMORY_SCALE = 4  # --memory: lengths this many times longer, so activations dominate


def spread_lengths(step: int, n: int = PROMPTS_PER_STEP * GROUP, scale: int = 1) -> list[int]:
    """n completion lengths of step `step` (log-normal, see the module docstring), the same on both sides."""
    import math

    gen = torch.Generator().manual_seed(10_000 + step)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    draws = (math.log(SPREAD_MEDIAN * scale) + SPREAD_SIGMA * normal).exp().round().long()
    return draws.clamp(SPREAD_MIN * scale, SPREAD_MAX * scale).tolist()


class ForcedLengths:
    """Makes row b of the next generation end at exactly `lengths[b]` tokens: EOS suppressed
    before, forced at that length. `ours(draw)` wraps our engine's token draw; `trl` is a
    transformers LogitsProcessor for TRL's `generate`. Only the draw is steered: the log-probs
    each side records are the model's own."""

    def __init__(self, eos: int):
        self.eos, self.lengths, self.t = eos, None, 0

    def start(self, lengths: list[int]) -> None:
        self.lengths, self.t = torch.tensor(lengths), 0

    def _steer(self, scores: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
        target = self.lengths[rows].to(scores.device)  # [A]
        scores = scores.clone()
        early = t + 1 < target  # [A]
        scores[early, self.eos] = -torch.inf
        last = t + 1 == target  # [A]
        scores[last] = torch.where(torch.arange(scores.shape[-1], device=scores.device) == self.eos, 0.0, -torch.inf)
        return scores

    def ours(self, draw):
        def forced_draw(logprobs, sampling, noise=None, alive=None):
            rows = alive.cpu() if alive is not None else torch.arange(logprobs.shape[0])
            token = draw(self._steer(logprobs, rows, self.t), sampling, noise, alive)
            self.t += 1
            return token
        forced_draw.unforced = draw
        return forced_draw

    def trl(self, prompt_width: int):
        from transformers import LogitsProcessor

        forced = self

        class Forced(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return forced._steer(scores, torch.arange(scores.shape[0]), input_ids.shape[1] - prompt_width)
        return Forced()


def build_model(hidden: int, layers: int, tokenizer, experts: str | None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from grpo.model.tiny import TinyBaseSpec, tiny_moe_config

    spec = TinyBaseSpec(hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2, num_experts=8,
                        top_k=2, expert_width=128)
    config = tiny_moe_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.output_router_logits = True
    torch.manual_seed(seed)
    kwargs = {"experts_implementation": experts} if experts else {}
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    from grpo.data.tasks import ArithmeticTask

    rows = ArithmeticTask(99, 9).all_rows()
    random.Random(seed).shuffle(rows)
    return rows[:n]


class OurStep:
    """One step of grpo-zero's loop: `grpo.run.step.run_step`, the function `grpo train` calls for every
    step, over a `StepContext` built here (the model and tokenizer of this benchmark, EOS ignored).

    Also used by bench/gpu_check.sh (CUDA, bf16, either engine): `device`, `dtype`, `engine`,
    `checkpoint` (a saved model directory, needed by vLLM), the batch shape and `lora` (a
    `model.lora` section: adapters on the frozen model) are parameters.
    """

    def __init__(self, hidden: int, layers: int, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 engine: str = "hf", checkpoint: str | None = None, prompts_per_step: int = PROMPTS_PER_STEP,
                 group: int = GROUP, new_tokens: int = NEW_TOKENS, vllm: dict | None = None, lora: dict | None = None,
                 forced: ForcedLengths | None = None):
        from grpo.algo.moe import RouterControl
        from grpo.config import RunConfig
        from grpo.data.prompts import PromptSampler
        from grpo.model.experts import experts_implementation
        from grpo.model.optim import make_optimizer, make_schedule
        from grpo.model.tiny import build_char_tokenizer
        from grpo.run.sampling import SamplingContext, sampling_params
        from grpo.run.step import LearningContext, StepContext
        from rewards import RewardSpec, Scorer
        from rollout import make_engine

        self.device = torch.device(device)
        self.new_tokens = new_tokens
        self.forced = forced
        tokenizer = build_char_tokenizer()
        experts = experts_implementation(None, self.device)  # as grpo.model.loading.load_policy picks
        if checkpoint:
            from transformers import AutoModelForCausalLM

            kwargs = {"experts_implementation": experts} if experts else {}
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **kwargs)
        else:
            model = build_model(hidden, layers, tokenizer, experts).to(dtype)
        model.to(self.device)
        if lora is not None:  # LoRA adapters on the frozen model (bench/lora.py)
            from grpo.config import LoRAConfig
            from grpo.model.lora import apply_lora

            model = apply_lora(model, LoRAConfig(**lora))
        cfg = RunConfig.model_validate({
            "model": {"lora": lora},
            "rollout": {"engine": engine, "group_size": group, "max_new_tokens": new_tokens, "temperature": 1.0,
                        "top_p": 1.0, "top_k": 0, "stop": [], "vllm": vllm or {}},
            "algorithm": {"advantage_scale": "group", "clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token_mean",
                          "num_iterations": 1},
            "trainer": {"prompts_per_step": prompts_per_step, "micro_batch_size": 64, "lr": LR,
                        "betas": (0.9, 0.999), "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0},
        })
        optimizer = make_optimizer(model, cfg.trainer)
        engine = make_engine(cfg.rollout, model, tokenizer, self.device, seed=0)
        sampling = SamplingContext(
            cfg, engine, Scorer([RewardSpec("math_answer", 1.0), RewardSpec("format", 0.5)], workers=0), tokenizer,
            PromptSampler(prompt_rows(512), seed=0),
            sampling=replace(sampling_params(cfg.rollout), ignore_eos=forced is None))
        if forced is not None:  # the engine module's draw, steered to the drawn lengths
            import rollout.hf.engine as hf_engine

            hf_engine.draw = forced.ours(getattr(hf_engine.draw, "unforced", hf_engine.draw))
        learning = LearningContext(cfg, engine, tokenizer, model, model, optimizer, make_schedule(optimizer, cfg.trainer),
                                   self.device, RouterControl(model, cfg.moe))  # expert-load metrics, as in every MoE run
        self.ctx = StepContext(sampling, learning)
        self.engine, self.model = engine, model
        self.step_index = 0

    def __call__(self) -> dict[str, float]:
        from grpo.run.step import run_step

        self.step_index += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        result = run_step(self.ctx, self.step_index)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        rollouts = result.batch.rollouts
        wanted = self.forced.lengths.tolist() if self.forced is not None else [self.new_tokens] * len(rollouts)
        assert [len(r.completion_ids) for r in rollouts] == wanted
        m = result.metrics
        return {"step": m["time/step"], "generate": m["time/generate"], "score": m["time/score"],
                "train": m["time/train"], "sync": m["time/weight_sync"], "tokens_per_s": m["rollout/tokens_per_s"]}


def run(size: str, steps: int, warmup: int, trl_experts: str | None, lengths: str = "fixed") -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.data.prompts import render_prompt
    from grpo.model.tiny import build_char_tokenizer
    from rewards import RewardSpec, Scorer

    hidden, layers = SIZES[size]
    trl_tokenizer = build_char_tokenizer()
    spread = lengths == "spread"
    cap = SPREAD_MAX if spread else NEW_TOKENS
    forced_ours = ForcedLengths(trl_tokenizer.eos_token_id) if spread else None
    ours = OurStep(hidden, layers, new_tokens=cap, forced=forced_ours)

    trl_model = build_model(hidden, layers, trl_tokenizer, trl_experts)
    drawn: list[int] = []  # every step's lengths, as generated
    if spread:  # TRL's generate gets the same lengths for its step k through a logits processor
        from transformers import LogitsProcessorList

        forced_trl, generate = ForcedLengths(trl_tokenizer.eos_token_id), trl_model.generate
        generations = [0]

        def forced_generate(*a, **kw):
            generations[0] += 1
            forced_trl.start(spread_lengths(generations[0]))
            processor = forced_trl.trl(kw["input_ids"].shape[1])
            return generate(*a, logits_processor=LogitsProcessorList([processor]), **kw)

        trl_model.generate = forced_generate
    # transformers 5.24's `generate` fails on Qwen3-MoE with router logits on (the load-balancing
    # loss meets a decode step's full-length attention mask), and with `router_aux_loss_coef=0`
    # TRL never reads them: switch them off on TRL's copy only (ours keeps them on in training
    # forwards, computing an aux loss it does not use: extra work on our side only).
    trl_model.config.output_router_logits = False
    scorer = Scorer([RewardSpec("math_answer", 1.0), RewardSpec("format", 0.5)], workers=0)

    def reward(prompts, completions, answer, **kwargs):  # the same scorer, the same example fields
        return scorer.score(list(completions), [{"answer": a} for a in answer]).total

    rows = prompt_rows(512, seed=1)
    data = Dataset.from_list([{"prompt": render_prompt("r1_zero_tiny", r), "answer": r["answer"]} for r in rows])
    total = warmup + steps
    args = GRPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "grpo-zero-bench-trl"),
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, num_generations=GROUP, max_steps=total,
        max_completion_length=cap, generation_kwargs={} if spread else {"min_new_tokens": NEW_TOKENS},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", learning_rate=LR, max_grad_norm=1.0, weight_decay=0.0,
        gradient_checkpointing=False, router_aux_loss_coef=0.0, use_vllm=False, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, log_completions=False,
    )
    times: dict[str, list[float]] = {"trl": [], "ours": [], "ours_generate": [], "ours_train": []}

    class Alternate(TrainerCallback):
        resumed = None

        def on_train_begin(self, *a, **k):
            self.resumed = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["trl"].append(time.perf_counter() - self.resumed)
            if spread:
                forced_ours.start(spread_lengths(len(times["trl"])))
                drawn.extend(forced_ours.lengths.tolist())
            split = ours()
            times["ours"].append(split["step"])
            times["ours_generate"].append(split["generate"])
            times["ours_train"].append(split["train"])
            self.resumed = time.perf_counter()

    trainer = GRPOTrainer(model=trl_model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=trl_tokenizer, callbacks=[Alternate()])
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its final metrics; stdout is one JSON line
        trainer.train()
    med = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    return {
        "bench": "step_vs_trl", "size": size, "hidden": hidden, "layers": layers,
        "prompts_x_completions": f"{PROMPTS_PER_STEP}x{GROUP}", "lengths": lengths,
        "new_tokens": NEW_TOKENS if not spread else (
            f"lognormal(median {SPREAD_MEDIAN}, sigma {SPREAD_SIGMA}) in [{SPREAD_MIN}, {SPREAD_MAX}]: mean "
            f"{statistics.mean(drawn):.1f}, mean step max {statistics.mean(max(drawn[i:i + 16]) for i in range(0, len(drawn), 16)):.1f}"),
        "steps_measured": len(times["ours"]) - warmup,
        "trl_s_per_step": round(med["trl"], 4), "ours_s_per_step": round(med["ours"], 4),
        "ratio_trl_over_ours": round(med["trl"] / med["ours"], 3),
        "ours_generate_s": round(med["ours_generate"], 4), "ours_train_s": round(med["ours_train"], 4),
        "trl_experts": trl_experts or "default", "threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "trl": __import__("trl").__version__,
    }


def memory_variant(size: str, variant: str) -> dict:
    """One policy update on a spread batch (in this process), packed or right-padded: peak RSS."""
    import resource

    from grpo.algo.moe import RouterControl
    from grpo.algo.update import policy_update
    from grpo.config import RunConfig
    from grpo.data.prompts import render_prompt
    from grpo.model.experts import experts_implementation
    from grpo.model.tiny import build_char_tokenizer
    from rollout.base import Rollout

    hidden, layers = SIZES[size]
    tokenizer = build_char_tokenizer()
    model = build_model(hidden, layers, tokenizer, experts_implementation(None, torch.device("cpu")))
    prompts, group = 8, 8
    lengths = spread_lengths(0, prompts * group, scale=MEMORY_SCALE)
    gen = torch.Generator().manual_seed(0)
    rollouts = []
    for b, (row, n) in enumerate(zip([r for r in prompt_rows(prompts) for _ in range(group)], lengths)):
        prompt = tuple(tokenizer.encode(render_prompt("r1_zero_tiny", row), add_special_tokens=False))
        completion = tuple(torch.randint(3, len(tokenizer), (n,), generator=gen).tolist())
        rollouts.append(Rollout(b // group, prompt, completion, "", tuple([-1.0] * n), "stop",
                                advantage=float(torch.randn(1, generator=gen))))
    cfg = RunConfig.model_validate({"trainer": {
        "prompts_per_step": prompts, "micro_batch_size": prompts * group,
        "max_tokens_per_micro_batch": None if variant == "padded" else 10**9}})  # one micro-batch either way
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    control = RouterControl(model, cfg.moe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    policy_update(model, optimizer, rollouts, cfg, tokenizer.pad_token_id, torch.device("cpu"), moe=control)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    return {"variant": variant, "peak_mb": round(peak, 1), "before_update_mb": round(before, 1),
            "update_mb": round(peak - before, 1), "seconds": round(seconds, 2), "tokens": tokens,
            "padded_positions": width * len(rollouts)}


def memory(size: str, threads: int) -> dict:
    """`memory_variant` packed and padded, each in a fresh process; one JSON line."""
    import subprocess

    out = {}
    for variant in ("padded", "packed"):
        proc = subprocess.run([sys.executable, __file__, "--size", size, "--threads", str(threads),
                               "--memory-variant", variant], capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"bench": "step_vs_trl_memory", "size": size, "batch": "8x8",
            "lengths": f"lognormal(median {MEMORY_SCALE * SPREAD_MEDIAN}, sigma {SPREAD_SIGMA}) in "
                       f"[{MEMORY_SCALE * SPREAD_MIN}, {MEMORY_SCALE * SPREAD_MAX}]", **out,
            "peak_ratio_packed_over_padded": round(out["packed"]["peak_mb"] / out["padded"]["peak_mb"], 3),
            "update_ratio_packed_over_padded": round(out["packed"]["update_mb"] / out["padded"]["update_mb"], 3),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="measured steps after the warm-up (default: 30, "
                        "16 with --lengths spread)")
    parser.add_argument("--lengths", choices=["fixed", "spread"], default="fixed",
                        help="completion lengths: 32 tokens each, or long-tailed (see the module docstring)")
    parser.add_argument("--memory", action="store_true",
                        help="trainer peak memory of one update on a spread batch, packed vs padded")
    parser.add_argument("--memory-variant", choices=["packed", "padded"], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3, 2 with --lengths spread)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-experts", default=None,
                        help="experts kernel of TRL's model (eager, grouped_mm; default: transformers' choice)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    sizes = ["tiny", "small"] if args.size == "both" else [args.size]
    if args.memory_variant:
        print(json.dumps(memory_variant(sizes[-1], args.memory_variant)), flush=True)
        return 0
    if args.memory:
        for size in sizes:
            print(json.dumps(memory(size, args.threads)), flush=True)
        return 0
    spread = args.lengths == "spread"
    steps = args.steps if args.steps is not None else (16 if spread else 30)
    warmup = args.warmup if args.warmup is not None else (2 if spread else 3)
    for size in sizes:
        print(json.dumps(run(size, steps, warmup, args.trl_experts, args.lengths)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
