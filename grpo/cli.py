"""The `grpo` command line.

    grpo train RECIPE [key=value ...] [--output-dir DIR] [--resume auto|PATH] [--toy]
               [--accelerate-config NAME|PATH [--num_machines N --machine_rank R --main_process_ip IP
                                               --main_process_port PORT]]
    grpo eval RECIPE --checkpoint PATH [--k 8] [--out DIR] [--toy] [key=value ...]
    grpo plan RECIPE --gpu h800|h100|h200|a100 [--nodes N --gpus-per-node G] [--price-per-gpu-hour P]
    grpo plan RECIPE [--gpu cpu]     # this machine's RAM (the default without a CUDA device)
    grpo recipes
    grpo score FILE.jsonl --reward NAME [--out RESULTS.jsonl]
    grpo fetch smollm2-135m-instruct
    grpo sandbox FILE.py [--recipe RECIPE] [key=value ...]
    grpo merge-lora RUN_DIR|ADAPTER_DIR OUT [--base MODEL]   # a LoRA run's adapter merged into its base
    grpo dashboard RUNS_DIR [--host 127.0.0.1] [--port 8050] [--export report.html]

Recipe problems (unknown key, wrong type, missing file, malformed YAML), and data, model,
checkpoint and disk problems, print one line naming the file, row or key and exit with status 2
(`grpo -v ...` adds the traceback; grpo/errors.py says which errors are the user's). A run stopped by repeated
non-finite losses, or by a reward that fails on every sample step after step, exits with status 3;
an asynchronous run whose generation process failed, with 4; one whose watchdog saw no progress for
`trainer.stall_stop_s` (grpo/run/watchdog.py), with 5; one stopped by SIGTERM or Ctrl-C after a whole
step, with 143 or 130.

`--accelerate-config` re-runs this command under `accelerate launch` with that config (a file of
recipes/accelerate/ by name, or a path); the launcher flags override the config's, e.g. for a
2-machine job run on machine R:
    grpo train RECIPE --output-dir DIR --accelerate-config multi-node-cpu \
        --num_machines 2 --machine_rank R --main_process_ip 10.0.0.1 --main_process_port 29500
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from grpo import dashboard
from grpo.commands import fetch, merge_lora, sandbox, score

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_GENERATION = 4  # asynchronous RL: the generation process failed (its error is printed)


def _fail(message: str) -> int:
    print(f"grpo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _toy(cfg, args: argparse.Namespace):
    """The recipe at toy scale (grpo/commands/toy.py), its changes listed on stderr once per job."""
    import os

    from grpo.commands.toy import toy_recipe

    cfg, notes = toy_recipe(cfg, args.overrides, source=args.recipe)
    if notes and os.environ.get("GRPO_ZERO_LAUNCHED") != "1":
        print(f"grpo: toy scale of {args.recipe}:\n  " + "\n  ".join(notes), file=sys.stderr)
    return cfg


def _launch_config(args: argparse.Namespace, launch) -> str | None:
    """The accelerate config this `grpo train` relaunches itself under: `--accelerate-config` (`none`:
    this process), else the recipe's `launch.accelerate_config`; never inside a launched job."""
    import os

    if os.environ.get("GRPO_ZERO_LAUNCHED") == "1":
        return None
    choice = args.accelerate_config or launch.accelerate_config
    if choice == "none":
        return None
    if args.num_machines is None and choice == launch.accelerate_config:
        args.num_machines = launch.num_machines
    return choice


def cmd_train(args: argparse.Namespace) -> int:
    from grpo.config import ConfigError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.toy:
            cfg = _toy(cfg, args)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    if args.resume == "auto" and not args.output_dir:
        return _fail("--resume auto needs --output-dir (the run directory to resume)")
    output_dir = Path(args.output_dir) if args.output_dir else Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.resume and output_dir.exists() and any(output_dir.iterdir()):
        return _fail(f"{output_dir}: output directory is not empty (choose another --output-dir, or --resume auto)")
    if args.resume and args.resume != "auto" and not (Path(args.resume) / "state.json").is_file():
        return _fail(f"--resume {args.resume}: not a checkpoint directory (no state.json)")

    accelerate_config = _launch_config(args, cfg.launch)
    if os.environ.get("GRPO_ZERO_LAUNCHED") != "1":  # once per job, before any process loads weights
        _check_memory(args, cfg, accelerate_config)
    if accelerate_config:
        return _relaunch(args, cfg, output_dir, accelerate_config)
    return _train_here(args, cfg, output_dir)


def _check_memory(args: argparse.Namespace, cfg, accelerate_config: str | None) -> None:
    """CPU runs: stop (NotEnoughMemory, exit 2) when the job's memory estimate exceeds this machine's
    RAM, warn when it exceeds what is available (grpo/commands/cpu_memory.py); config only, no weights."""
    import torch

    from grpo.commands.cpu_memory import check_cpu_memory, local_processes
    from grpo.config import resolve_accelerate_config

    if torch.cuda.is_available():
        return
    try:
        processes = local_processes(resolve_accelerate_config(accelerate_config) if accelerate_config else None)
    except (FileNotFoundError, ValueError, TypeError):
        processes = 1  # _relaunch names a missing config
    check_cpu_memory(cfg, args.recipe, processes, warn=lambda line: print(f"grpo: warning: {line}", file=sys.stderr))


def _relaunch(args: argparse.Namespace, cfg, output_dir: Path, accelerate_config: str) -> int:
    """This `grpo train` again, under `accelerate launch` with that config."""
    from grpo.config import resolve_accelerate_config
    from grpo.run.launch import launch, launched_processes
    from grpo.run.processes import UnsupportedError, check_supported

    try:
        config = resolve_accelerate_config(accelerate_config)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    try:  # refuse unsupported layouts here, before the launcher starts any process
        check_supported(cfg, launched_processes(config, args.num_machines))
    except UnsupportedError as exc:
        return _fail(f"{args.recipe}: {exc}")
    rest = [args.recipe, *args.overrides, "--output-dir", str(output_dir)] + (["--toy"] if args.toy else [])
    if args.resume:
        rest += ["--resume", args.resume]
    for key in args.allow_change:
        rest += ["--allow-change", key]
    return launch(config, rest, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  main_process_ip=args.main_process_ip, main_process_port=args.main_process_port)


def _train_here(args: argparse.Namespace, cfg, output_dir: Path) -> int:
    """Train in this process; the ways a run stops early, each with its line and exit status."""
    from grpo.run.async_rollouts import GenerationError, GenerationStalled
    from grpo.run.processes import UnsupportedError
    from grpo.run.train import AlreadyFinished, NonFiniteError, RewardFailure, Stopped, train
    from grpo.run.watchdog import EXIT_STALLED
    from rewards import UnknownRewardError

    try:
        summary = train(cfg, output_dir, resume=args.resume, allow_changes=tuple(args.allow_change))
    except UnknownRewardError as exc:
        return _fail(f"{args.recipe}: rewards.functions: {exc}")
    except UnsupportedError as exc:
        return _fail(f"{args.recipe}: {exc}")
    except (NonFiniteError, RewardFailure) as exc:
        print(f"grpo: stopped: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except GenerationStalled as exc:  # its watchdog stopped the generation process; the line says why
        print(str(exc), file=sys.stderr)
        return EXIT_STALLED
    except GenerationError as exc:  # the generation process of an asynchronous run failed
        print(f"grpo: stopped: {exc}", file=sys.stderr)
        return EXIT_GENERATION
    except AlreadyFinished as exc:
        print(f"grpo: {exc}", file=sys.stderr)
        return 0
    except Stopped as exc:  # SIGTERM / SIGINT: after a whole step, checkpointed when checkpoints are on
        print(f"grpo: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if "train" in summary:  # the main process reports
        _report(summary, output_dir)
    return 0


def _report(summary: dict, output_dir: Path) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        print(f"held-out greedy accuracy (correct: {correct_phrase(summary.get('correct'))}): "
              f"before RL {before['accuracy']:.3f}, after RL {after['accuracy']:.3f} "
              f"({after['num_prompts']} prompts)")
    fmt = summary["train"]["format_reward_last"]
    if fmt is not None:
        print(f"format reward over the last 10% of steps: {fmt:.3f}")
    think = summary.get("thinking")
    if think and think["think_tokens_last_10pct"]:
        print(f"tokens inside <think> per completion, first -> last 10% of steps: {think['think_tokens_first_10pct']:.1f} -> "
              f"{think['think_tokens_last_10pct']:.1f}; consistent steps {think['consistent_first_10pct']:.2f} -> "
              f"{think['consistent_last_10pct']:.2f}")
    print(f"run directory: {output_dir}  ({summary['train']['seconds']:.0f} s)")


def correct_phrase(names: list[str] | None) -> str:
    """What "correct" meant in a report, e.g. `math_answer and format score 1.0`."""
    if not names:
        return "the correct answer in the required format"
    return f"{' and '.join(names)} score{'s' if len(names) == 1 else ''} 1.0"


def _checkpoint_label(checkpoint: Path, step: int | None) -> str:
    """`step-N` from --step, a `step-N` directory name, or a run's summary (for `final`)."""
    import json
    import re

    if step is not None:
        return f"step-{step}"
    match = re.fullmatch(r"(?:step|checkpoint)[-_]0*(\d+)", checkpoint.name)
    if match:
        return f"step-{int(match.group(1))}"
    summary = checkpoint.parent / "summary.json"
    if checkpoint.name == "final" and summary.is_file():
        return f"step-{json.loads(summary.read_text())['train']['steps']}"
    return checkpoint.name


def cmd_eval(args: argparse.Namespace) -> int:
    from grpo.config import ConfigError, load_recipe
    from grpo.model.lora import is_adapter_dir

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    adapter = checkpoint if is_adapter_dir(checkpoint) else None  # a LoRA run's: loaded on the recipe's base
    overrides = list(args.overrides) + ([f"model.name_or_path={checkpoint}"] if checkpoint and not adapter else [])
    try:
        cfg = load_recipe(args.recipe, overrides)
        if args.toy:
            args.overrides = overrides  # the checkpoint replaces the toy model
            cfg = _toy(cfg, args)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    if checkpoint is not None and not adapter and not (checkpoint / "config.json").is_file():
        return _fail(f"{checkpoint}: not a model directory (no config.json, nor a LoRA adapter's adapter_config.json)")
    if args.k is not None and args.k < 1:
        return _fail("--k must be at least 1")

    import torch

    from grpo.data.sources import load_eval_sets, load_rows
    from grpo.errors import UserError
    from grpo.model.loading import load_policy
    from grpo.model.lora import adapter_rank
    from grpo.run.evaluate import evaluate_sets, format_table, make_eval_scorer, write_report
    from grpo.run.sampling import engine_lengths
    from grpo.run.step import sync_engine
    from rewards import UnknownRewardError
    from rollout import make_engine

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        scorer = make_eval_scorer(cfg)
    except UnknownRewardError as exc:
        return _fail(f"{args.recipe}: eval.correct: {exc}")
    try:
        model, tokenizer = load_policy(cfg.model, device, path=adapter, progress=cfg.logging.progress)
        _, heldout = load_rows(cfg.data, cfg.eval.num_prompts, tokenizer)
        sets = load_eval_sets(cfg, heldout)
    except UserError as exc:  # bad data, a refused reasoning_gym task, a model that does not load
        scorer.close()
        return _fail(str(exc))
    if not sets:
        scorer.close()
        return _fail(f"{args.recipe}: nothing to evaluate (eval.num_prompts is 0 and eval.datasets is empty)")
    engine = make_engine(cfg.rollout, model, tokenizer, device, seed=cfg.trainer.seed,  # the recipe's engine
                         lora_rank=adapter_rank(model) if cfg.rollout.engine == "vllm" else None,
                         **engine_lengths(cfg, tokenizer, *sets.values()))
    from grpo.run.tools import make_environment

    environment = make_environment(cfg.rollout.tools)
    try:
        if adapter is not None:  # vLLM samples with the adapter (the HF engine decodes with the module itself)
            sync_engine(engine, model, model, "adapter")
        report = evaluate_sets(engine, tokenizer, cfg, sets, scorer, k=args.k, seed=cfg.trainer.seed,
                               environment=environment)
    finally:
        engine.close()
        scorer.close()
        if environment is not None:
            environment.close()
    report["checkpoint"] = str(checkpoint or cfg.model.name_or_path)
    print(format_table(report))
    print(f"correct: {correct_phrase(report['correct'])}")
    if args.out:
        label = _checkpoint_label(checkpoint, args.step) if checkpoint else "base"
        print(f"written: {write_report(args.out, label, report)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from grpo.commands.plan import (
        DEFAULT_MEAN_FRACTION,
        format_report,
        layout_from_recipe,
        make_plan,
        resolve_arch,
        workload_from_recipe,
    )
    from grpo.config import ConfigError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.gpu is None:
        import torch

        if torch.cuda.is_available():
            return _fail("--gpu is needed (h800, h100, h200, a100, a100-40; or cpu for this machine's RAM)")
        args.gpu = "cpu"
    if args.gpu == "cpu":
        return _plan_cpu(args, cfg)
    layout = layout_from_recipe(cfg)  # the recipe's launcher and engine; flags win
    if any(getattr(args, n) not in (None, layout.get(n)) for n in ("nodes", "gpus_per_node", "sharding")):
        layout.pop("launcher", None)  # the layout is the flags', not the launcher config's
    forced_tp = args.tp
    for name in ("nodes", "gpus_per_node", "sharding", "tp"):
        if getattr(args, name) is None and name in layout:
            setattr(args, name, layout[name])
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) is None:
            return _fail(f"--{name.replace('_', '-')} is needed: {args.recipe} names no launch.accelerate_config")
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    try:
        arch = resolve_arch(cfg.model.name_or_path)
    except ValueError as exc:
        return _fail(str(exc))
    work = workload_from_recipe(cfg, args.steps, args.prompt_tokens, args.mean_response_tokens)
    mean_source = ("--mean-response-tokens" if args.mean_response_tokens else
                   f"default: {DEFAULT_MEAN_FRACTION:g} x max_new_tokens; pass --mean-response-tokens")
    common = dict(sharding=args.sharding or "full", price=args.price_per_gpu_hour, engine=layout["engine"],
                  engine_share=layout.get("engine_share"), launcher=layout.get("launcher"),
                  max_num_seqs=layout.get("max_num_seqs"))
    plan = make_plan(arch, args.gpu, args.nodes, args.gpus_per_node, work, tp=args.tp, **common)
    if plan.rollout_why_not() is not None and forced_tp is None and layout["engine"] == "vllm":
        # the recipe's TP does not hold the rollouts: search (the training phase is the same in every layout)
        searched = make_plan(arch, args.gpu, args.nodes, args.gpus_per_node, work, **common)
        if searched.rollout_why_not() is None:
            searched.notes.insert(0, f"the recipe's TP={args.tp} does not fit ({plan.rollout_why_not()}); the "
                                     f"layout above does")
            plan = searched
    print(format_report(plan, use_rich=not args.plain, mean_source=mean_source), end="")
    if not plan.fits:
        print(f"grpo plan: does not fit: {plan.why_not()}", file=sys.stderr)
    return 0 if plan.fits else 1


def _plan_cpu(args: argparse.Namespace, cfg) -> int:
    """`grpo plan RECIPE --gpu cpu`: the job's memory on this machine, by part; exit 1 when it does
    not fit in the RAM."""
    from grpo.commands.cpu_memory import cpu_report_rows, estimate_cpu_memory, local_processes, machine_memory
    from grpo.commands.plan import format_rows, resolve_arch
    from grpo.config import resolve_accelerate_config

    try:
        arch = resolve_arch(cfg.model.name_or_path)
    except ValueError as exc:
        return _fail(str(exc))
    config = cfg.launch.accelerate_config
    est = estimate_cpu_memory(cfg, arch, local_processes(resolve_accelerate_config(config) if config else None))
    mem = machine_memory()
    print(format_rows(f"grpo plan: {arch.name} on this machine's CPU", cpu_report_rows(cfg, est, mem),
                      use_rich=not args.plain), end="")
    if mem and est.total_gib > mem.total_gib:
        print(f"grpo plan: this run does not fit in this machine's {mem.total_gib:.1f} GiB (see 'does not fit' above)",
              file=sys.stderr)
        return 1
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "recipes"
    files = sorted(folder.glob("*.yaml"))
    if not files:
        return _fail(f"{folder}: no recipes found")
    width = max(len(f.name) for f in files)
    for f in files:
        print(f"{f.name.ljust(width)}  {_recipe_summary(f)}")
    return 0


def _recipe_summary(path: Path) -> str:
    """The first header comment line of a recipe (its one-line summary)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return text
    return "(no header comment)"


def _add_plan_parser(verbs) -> None:
    """`grpo plan`: memory, time and cost of a recipe on a cluster, or its memory on this CPU."""
    plan = verbs.add_parser(
        "plan", help="estimate memory per GPU, time and cost of a recipe on a cluster (or its memory on this CPU)",
        description="Estimate, for RECIPE on NODES x GPUS-PER-NODE GPUs: memory per GPU while training (weights, "
        "gradients, optimizer states, activations) and while generating (engine weights, KV cache), whether it fits, "
        "and the time, GPU-hours and money of a step and of the whole run from generation and training FLOPs at the "
        "stated utilisation. Exit status 1 when it does not fit. The model's architecture comes from an embedded "
        "table of known models, a local config.json, or the Hub. With --gpu cpu (the default without a CUDA device): "
        "the run's memory on this machine's CPU against its RAM (grpo/commands/cpu_memory.py).")
    plan.add_argument("recipe", metavar="RECIPE", help="path of a YAML recipe")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. rollout.max_new_tokens=8192")
    plan.add_argument("--nodes", type=int, metavar="N", help="number of nodes (default: the recipe's launch section)")
    plan.add_argument("--gpus-per-node", type=int, metavar="G",
                      help="GPUs per node (default: the processes per machine of the recipe's accelerate config)")
    plan.add_argument("--gpu", choices=["h800", "h100", "h200", "a100", "a100-40", "cpu"], help="GPU model, or cpu: this "
                      "machine's RAM for a CPU run (the default without a CUDA device; cluster flags are then unused)")
    plan.add_argument("--price-per-gpu-hour", type=float, default=2.0, metavar="P", help="USD per GPU-hour (default 2)")
    plan.add_argument("--sharding", choices=["full", "hybrid", "none"],
                      help="FSDP2 full shard over all GPUs, hybrid: shard within a node and replicate across, none: "
                      "replicated (DDP) (default: from the recipe's accelerate config, else full)")
    plan.add_argument("--tp", type=int, metavar="T", help="rollout engine tensor-parallel size, taken as is (default: the "
                      "recipe's rollout.vllm.tensor_parallel_size where it fits, else the smallest layout that fits)")
    plan.add_argument("--steps", type=int, metavar="S", help="steps of the whole run (default trainer.steps)")
    plan.add_argument("--prompt-tokens", type=int, metavar="T", help="mean prompt length (default 256, or data.max_prompt_tokens if smaller)")
    plan.add_argument("--mean-response-tokens", "--response-tokens", dest="mean_response_tokens", type=int, metavar="T",
                      help="mean completion length over the run, which sets the time (default rollout.max_new_tokens/2)")
    plan.add_argument("--plain", action="store_true", help="plain text instead of a rich table")
    plan.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="R1-Zero-style RL for language models (GRPO and relatives).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="train a policy from a recipe",
                             description="Train a policy with the recipe RECIPE; key=value pairs override recipe fields.")
    train.add_argument("recipe", metavar="RECIPE", help="path of a YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. trainer.steps=50")
    train.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<recipe>-<time>)")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from a checkpoint: auto = the newest in --output-dir (none yet: start), or a path")
    train.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                       help="with --resume: accept a recipe key (or a section, e.g. algorithm) that differs from the "
                       "checkpoint's (run length, logging, evaluation and speed settings may always change)")
    train.add_argument("--toy", action="store_true",
                       help="toy scale: the recipe's code path with a random-init model of its architecture family, "
                       "a local tokenizer and local data in its columns, 2 steps (grpo/commands/toy.py); no network")
    launch = train.add_argument_group("launching (accelerate)")
    launch.add_argument("--accelerate-config", metavar="NAME|PATH",
                        help="run under `accelerate launch` with recipes/accelerate/NAME.yaml or a config file "
                        "(default: the recipe's launch.accelerate_config; `none`: this one process)")
    launch.add_argument("--num_machines", type=int, help="machines in the job (overrides the config)")
    launch.add_argument("--machine_rank", type=int, help="rank of this machine, 0 .. num_machines-1")
    launch.add_argument("--main_process_ip", help="address of machine 0")
    launch.add_argument("--main_process_port", type=int, help="port on machine 0 for the rendezvous")
    train.set_defaults(func=cmd_train)

    ev = verbs.add_parser(
        "eval", help="evaluate a checkpoint on the recipe's held-out problems and eval data sets",
        description="Evaluate CHECKPOINT (a saved model directory, e.g. runs/x/final) on the recipe's held-out "
        "problems (eval.num_prompts) and eval.datasets: greedy accuracy, and with --k N > 1 also avg@N, "
        "unbiased pass@k and maj@N. Correct means every reward in eval.correct scores 1.0 (default: the source's "
        "answer reward, plus format when the template asks for the <answer> tags), as in the training summary.")
    ev.add_argument("recipe", metavar="RECIPE", help="the recipe the checkpoint was trained with")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. eval.num_prompts=50")
    ev.add_argument("--checkpoint", metavar="PATH", help="model directory to evaluate (default: the recipe's model.name_or_path)")
    ev.add_argument("--k", type=int, metavar="N", help="samples per problem for avg@N/pass@k/maj@N (default: eval.k; 1 = greedy only)")
    ev.add_argument("--out", metavar="DIR", help="also write DIR/eval/step-N.json (N from --step, the checkpoint's name or its run's summary; replaces a report of the same step)")
    ev.add_argument("--step", type=int, metavar="N", help="step number to file the report under")
    ev.add_argument("--toy", action="store_true", help="the recipe at toy scale, as `grpo train --toy` ran it")
    ev.set_defaults(func=cmd_eval)

    _add_plan_parser(verbs)

    rec = verbs.add_parser("recipes", help="list the shipped recipes, one line each",
                           description="List the recipes shipped in recipes/ with the first line of each header comment.")
    rec.add_argument("--dir", metavar="DIR", help="another folder of recipes")
    rec.set_defaults(func=cmd_recipes)

    score.add_parser(verbs)
    fetch.add_parser(verbs)
    sandbox.add_parser(verbs)
    merge_lora.add_parser(verbs)
    dashboard.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options (`grpo eval R --checkpoint C a.b=1`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # the one boundary: a user error is one line, a bug keeps its traceback
        from grpo.errors import describe

        message = describe(exc)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
