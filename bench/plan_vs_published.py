"""`grpo plan`'s clock against published R1-Zero-style runs: predicted and published GPU-hours.

    python bench/plan_vs_published.py

Each run below is planned with the same constants (grpo/commands/roofline.py: EFFICIENCY and the
GPU table); nothing here is tuned per run. A run's `mean` is its mean completion length over the
run, read off the publisher's length curve where no number is printed (said so next to it).
A row passes within 35% (|predicted / published - 1| <= 0.35); the script exits 1 otherwise.
Where a publisher states its engine's TP size or vLLM max_num_seqs, the stage plans with them (the recipe
fields rollout.vllm.tensor_parallel_size and max_num_seqs), as `grpo plan` does with a recipe's. A `split`
stage ran generation and training on disjoint halves of its GPUs, synchronously (AReaL v0.1's
`vllm.dXmY+dZpW` allocation): it is planned colocated on one half (engines of that half generate, the trainer
of that half trains, one after the other, as the split run does) and its GPU-hours counted for all its GPUs.

OUTSIDE lists published runs with every figure a row needs that the clock does not meet: printed, with
their ratio, under the table, and not counted in the exit status (see the comment above it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpo.commands.plan import KNOWN_ARCHS, Workload, make_plan  # noqa: E402

TOLERANCE = 0.35


@dataclass(frozen=True)
class Stage:
    gpus: int  # GPUs of the stage (8 per node)
    steps: int  # generation batches (as trainer.steps counts)
    prompts: int  # prompts per generation batch (trainer.prompts_per_step)
    group: int
    max_new: int
    mean: int  # mean completion tokens over the stage
    prompt: int = 200  # mean prompt tokens (template + problem)
    mini_batches: int = 1  # optimizer steps per generation batch (algorithm.mini_batches)
    extra_forwards: int = 0  # reference model (KL > 0), recomputed old log-probs
    schedule: tuple[tuple[int, int], ...] = ()  # (from generation batch, cap)
    offload: bool = False  # trainer.activation_offload (checkpointing is on for every run)
    tp: int | None = None  # the publisher's rollout tensor-parallel size (None: the planner's search)
    max_num_seqs: int | None = None  # the publisher's vLLM max_num_seqs per engine (None: the planner's default)
    split: bool = False  # engines on half the GPUs, the trainer on the other half, one after the other


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    gpu: str
    published_gpu_hours: float
    stages: tuple[Stage, ...]
    source: str


RUNS: tuple[Run, ...] = (
    Run("DeepSeek-R1-Zero", "deepseek-ai/DeepSeek-V3-Base", "h800", 198 * 512, (
        # 32 questions x 16 samples per optimizer step; generation batches of 8,192 outputs (512 prompts)
        # in 16 mini-batches; KL 0.001 (a reference forward); 32,768 new tokens, 65,536 from optimizer step
        # 8,200 (generation batch 513); ~10,400 optimizer steps = 650 generation batches; mean ~4,500 tokens
        # read off the length figure (Nature Fig. 1b / arXiv 2501.12948 Fig. 3). As recipes/deepseek-v3-r1-zero.yaml.
        Stage(512, 650, 512, 16, 65536, 4500, prompt=200, mini_batches=16, extra_forwards=2,
              schedule=((0, 32768), (513, 65536)), offload=True),),
        "DeepSeek-R1 (Nature 645, 2025) supplementary: R1-Zero trained on 64 x 8 H800 for about 198 hours "
        "(101K GPU-hours in the cost table); hyper-parameters in the supplementary's R1-Zero training details"),
    Run("Oat-Zero-7B", "Qwen/Qwen2.5-Math-7B", "a100", 27 * 8, (
        # examples/qwen2.5-math-7b.sh: 128 prompts x 8 samples, 3,000 new tokens, Dr. GRPO, no KL; MATH
        # level 3-5 (8,523 questions) x --num_prompt_epoch 20 / 128 = 1,332 steps (assumed run to the end);
        # mean ~700 tokens read off the paper's Dr. GRPO length curves (Fig. 5, 7B stays under 1,000).
        Stage(8, 1332, 128, 8, 3000, 700, prompt=150),),
        "Liu et al., Understanding R1-Zero-Like Training, arXiv 2503.20783 (section 4 / README of "
        "github.com/sail-sg/understand-r1-zero): 27 hours on 8 A100"),
    Run("DeepScaleR-1.5B-Preview", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "a100", 3800, (
        # 8K context, steps 0-1040, 8 A100, 128 x 8; mean ~4,000 (the blog: 5,500 falling to 3,500, then
        # rising against the cap); KL 0.001 and veRL's old log-prob recompute: 2 extra forwards.
        Stage(8, 1040, 128, 8, 8192, 4000, prompt=120, extra_forwards=2),
        # 16K, steps 1040-1520, 32 A100, 128 x 16; mean ~5,500 (blog length curve).
        Stage(32, 480, 128, 16, 16384, 5500, prompt=120, extra_forwards=2),
        # 24K, steps 1520-1750, 32 A100, 128 x 16; mean ~7,000 (blog length curve).
        Stage(32, 230, 128, 16, 24576, 7000, prompt=120, extra_forwards=2)),
        "Luo et al., DeepScaleR blog (Feb 2025) and hf.co/agentica-org/DeepScaleR-1.5B-Preview model card: "
        "iterative context lengthening 8K/16K/24K, about 3,800 A100 GPU-hours in all"),
    # AReaL v0.1 (inclusionAI/AReaL, release 2025-02-24), its tutorial examples/README.md (commits 2963a67..bc6567d):
    # "Hardware Requirements" table, 7B: 4 nodes / 16 nodes of "8x H800 per node", "Total Time (Hours)" 410 / 130;
    # "Number of Epochs defaults to 10", "approximately ... 20 steps [per epoch] for the 7B model" (its 16-node log
    # prints "step 6/19": 10 x 19 = 190 steps, 2,122-2,406 s each). The same 410 and 130 hours in blog/AReaL_v0_1.md,
    # Figure 2 ("Total RL training time for 10 epochs"). examples/train_batch_7B_n{4,16}.sh: DeepSeek-R1-Distill-
    # Qwen-7B, 1024 prompts x 16, 16,384 new tokens, vLLM max_num_seqs 128, 4 PPO mini-batches, KL 0.01 (a reference
    # forward; old log-probs come from the sampler), no critic (ppo.disable_value=True); allocation
    # vllm.d16p1m4+d32p2m1 (16 nodes) and vllm.d4p1m4+d8p2m1 (4 nodes): vLLM engines of TP 4 on half the GPUs, the
    # trainer on the other half. Mean completion ~7,800 tokens: printed in the tutorial's 16-node log
    # (avg_seq_len 7,773-8,204 with avg_prompt_len 105-112 over global steps 1-6; only those steps are printed).
    Run("AReaL-v0.1-R1-Distill-7B (16 nodes)", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "h800", 130 * 128, (
        Stage(128, 190, 1024, 16, 16384, 7800, prompt=106, mini_batches=4, extra_forwards=1, tp=4, max_num_seqs=128,
              split=True),),
        "AReaL v0.1 tutorial (github.com/inclusionAI/AReaL examples/README.md, Feb 2025) and blog/AReaL_v0_1.md "
        "Figure 2: 7B, 16 nodes x 8 H800, 130 hours for 10 epochs"),
    Run("AReaL-v0.1-R1-Distill-7B (4 nodes)", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "h800", 410 * 32, (
        Stage(32, 190, 1024, 16, 16384, 7800, prompt=106, mini_batches=4, extra_forwards=1, tp=4, max_num_seqs=128,
              split=True),),
        "AReaL v0.1 tutorial (github.com/inclusionAI/AReaL examples/README.md, Feb 2025) and blog/AReaL_v0_1.md "
        "Figure 2: 7B, 4 nodes x 8 H800, 410 hours for 10 epochs"),
)

# Published runs with every figure a row needs that the clock does NOT meet with the shared constants: printed
# under the table with their ratio, not counted in the exit status. Nothing is tuned to bring them in.
# SimpleRL-Zoo (Zeng et al., arXiv 2503.18892), github.com/hkust-nlp/simpleRL-reason branch v1 README: "we
# utilized 2x8 H100-80G GPUs to train 7B and 14B models for approximately 100 steps over 15 hours using 8K
# examples. For training the 32B models, we used 8x8 H100-80G GPUs, completing the training in 1.5 days with the
# same dataset." Its commands: --max_response_length 8192 --train_batch_size 1024 --rollout_n 8, kl_loss_coef
# 1e-4 (7B) / 1e-3 (32B), rollout TP 2 / 8; train_grpo_math_tune_ray.sh: ppo_mini_batch_size 256 (4 optimizer
# steps per batch), use_kl_loss (a reference forward) and verl's recomputed old log-probs: 2 extra forwards; its
# verl fork's rollout config: max_num_seqs 1024, enforce_eager True. Mean completion read off the README's Figure
# 1 ("Accuracy and response length across training iterations"): Qwen-2.5-7B ~830 tokens (0.66K-1.02K over
# steps 0-120), Qwen-2.5-32B ~740 tokens (0.45K-0.85K over steps 0-155); the 32B's ~155 steps are read off the
# same figure's x-axis. Predicted ~0.3x of published: the roofline's ~2.5 min per step for the 7B against the
# published ~9 min (15 h / 100 steps).
OUTSIDE: tuple[Run, ...] = (
    Run("SimpleRL-Zoo-Qwen2.5-7B", "Qwen/Qwen2.5-7B", "h100", 15 * 16, (
        Stage(16, 100, 1024, 8, 8192, 830, prompt=150, mini_batches=4, extra_forwards=2, tp=2, max_num_seqs=1024),),
        "SimpleRL-Zoo README (github.com/hkust-nlp/simpleRL-reason, v1): 2x8 H100, ~100 steps over 15 hours"),
    Run("SimpleRL-Zoo-Qwen2.5-32B", "Qwen/Qwen2.5-32B", "h100", 36 * 64, (
        Stage(64, 155, 1024, 8, 8192, 740, prompt=150, mini_batches=4, extra_forwards=2, tp=8, max_num_seqs=1024),),
        "SimpleRL-Zoo README (github.com/hkust-nlp/simpleRL-reason, v1): 8x8 H100, 1.5 days"),
)


# Looked for and left out: Open-Reasoner-Zero (2503.24290), DAPO (2503.14476),
# Light-R1, LIMR, Logic-RL, TinyZero: no hardware-hours figure found in the stored copies of their reports.
# Candidates with hardware and hours but not yet the batch, step count and mean length a row needs:
# Open-RS (Dang and Ngo, arXiv 2503.16219, abstract): DeepSeek-R1-Distill-Qwen-1.5B, 4 A40 48GB within 24 hours
# (96 GPU-hours; also needs an A40 row in roofline.GPUS: PCIe, 696 GB/s GDDR6); DeepCoder-14B-Preview
# (together.ai/blog/deepcoder): 32 H100 for 2.5 weeks (~13,400 GPU-hours), 16K then 32K context, asynchronous
# (verl-pipe) and code rewards, so not a synchronous R1-Zero-style run. Sky-T1-mini (novasky-ai.github.io/posts/
# sky-t1-7B, Feb 2025): DeepSeek-R1-Distill-Qwen-7B, 8 H100, 256 prompts x 4 (SkyThought run-sky-t1-mini.sh), 119
# steps at 8K "~28 hours" then 29 steps at 16K "~8.7 hours", but no mean response length printed or plotted.
# AReaL v0.1's 1.5B rows (1 / 4 / 16 nodes: 520 / 150 / 50 hours, 1024 x 8, 16,384 new tokens, ~400 steps): no
# mean length for that configuration (the blog's length curve is of its 8K/16K/24K run).


def predict(run: Run) -> tuple[float, list]:
    """Predicted GPU-hours of a run (the sum of its stages) and each stage's plan."""
    hours, plans = 0.0, []
    for st in run.stages:
        work = Workload(prompts_per_step=st.prompts, group_size=st.group, prompt_tokens=st.prompt,
                        response_tokens=st.mean, max_new_tokens=st.max_new, steps=st.steps, micro_batch_size=1,
                        extra_forwards=st.extra_forwards, mini_batches=st.mini_batches,
                        max_new_tokens_schedule=st.schedule, activation_offload=st.offload)
        planned = st.gpus // 2 if st.split else st.gpus
        plan = make_plan(KNOWN_ARCHS[run.model], run.gpu, planned // 8, 8, work, tp=st.tp, max_num_seqs=st.max_num_seqs)
        hours += plan.run_seconds() * st.gpus / 3600
        plans.append(plan)
    return hours, plans


def _row(run: Run) -> bool:
    """Print one run's row; whether it is within the tolerance."""
    hours, plans = predict(run)
    ratio = hours / run.published_gpu_hours
    layout = "; ".join(f"{p.world}x TP{p.layout.tp}" + (f" DP{p.layout.dp}" if p.layout.dp > 1 else "")
                       + (" split" if st.split else "") for p, st in zip(plans, run.stages))
    ok = abs(ratio - 1) <= TOLERANCE
    fits = "yes" if all(p.fits for p in plans) else "no*"
    print(f"{run.name:<36} {run.gpu:<6} {layout:<24} {fits:<5} {hours:>10,.0f} {run.published_gpu_hours:>10,.0f} "
          f"{ratio:>6.2f}{'' if ok else '  <- off'}")
    return ok


def main() -> int:
    print(f"{'run':<36} {'GPU':<6} {'layout':<24} {'fits':<5} {'predicted':>10} {'published':>10} {'ratio':>6}")
    bad = sum(not _row(run) for run in RUNS)
    if OUTSIDE:
        print("not met (listed, not counted; see OUTSIDE in this file):")
        for run in OUTSIDE:
            _row(run)
    if any(not p.fits for run in RUNS for p in predict(run)[1]):
        print("fits no*: this project's trainer (FSDP2, no context parallel) would not hold the publisher's longest "
              "sequences; the time is still the roofline's")
    print(f"within {TOLERANCE:.0%}: {len(RUNS) - bad} of {len(RUNS)} runs (constants: grpo/commands/roofline.py)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
