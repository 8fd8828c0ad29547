"""Generation alone: our transformers engine's completion tokens/s over vLLM's, same model, same run.

CPU (what `make bench` runs):
    python bench/generate_vs_vllm.py [--size tiny|small|both] [--batch 2x8] [--threads 2] [--reps 7]
    python bench/generate_vs_vllm.py --batch 2x8,8x8     # also a bigger batch (one line per size and batch)
GPU: python bench/generate_vs_vllm.py --device cuda --dtype bfloat16 [--vllm-compile]

The comparison to make before choosing `rollout.engine`: `rollout.hf.engine.HFEngine` against the
colocated `rollout.vllm.engine.VLLMEngine` (in-process, `enforce_eager=True` unless --vllm-compile),
both as `grpo train` builds them, on one model. The model is the random-init Qwen3-MoE of
bench/step_vs_trl.py (tiny: hidden 128, 4 layers; small: hidden 512, 8 layers; 4 heads / 2 KV
heads of head_dim 32, 8 experts top-2 of width 128: shapes vLLM's CPU attention and MoE kernels
take), with the local character tokenizer, saved to a temporary directory for vLLM and loaded
from it for ours (the experts kernel `grpo train` picks for the device), so both hold the same
weights in the same dtype (float32 by default).

The work, identical on both sides: P prompts x G completions (`--batch`, default 2 x 8) of the
arithmetic task's R1-Zero prompt, exactly 32 new tokens each (`ignore_eos`), temperature 1, no
top-k / top-p, per-prompt seeds (`prompt_seeds`). Every repetition takes fresh prompts and seeds
(the same for both engines), and vLLM's prefix cache is reset before each call (outside the
timing), as after a weight update in training: the prompts' shared template may be reused within a
call, never across calls.

Threads decide vLLM's speed on a CPU (in-process it runs in this thread), so each engine is timed at
every thread count in {1, 2, --threads} (on a GPU only at --threads), `torch.set_num_threads` set
before each call. The headline fields are at --threads (what the other benches use); `*_best_*`
fields give each engine at its best thread count. After one untimed warm-up repetition (vLLM's
first calls are slow), repetitions interleave engines and thread counts (order reversing each
time); medians are reported with the 1-minute load average. At most --reps repetitions, at least
--min-reps, and none started past --budget-s seconds of measuring (a loaded machine gets fewer;
`reps` says how many). One JSON line per size and batch; the default run took 150-165 s on a
shared 2-core machine (load 3-8).

Without an importable vLLM this prints one JSON line with `"skipped"` and the reason, and exits 0
(`make bench` runs on machines without vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ENGINES = ("hf", "vllm")


def parse_batch(text: str) -> tuple[int, int]:
    prompts, _, group = text.partition("x")
    return int(prompts), int(group)


def run(size: str, args, vllm_version: str) -> list[dict]:
    """Both engines on one saved model of `size`; one result per `--batch` entry."""
    from transformers import AutoModelForCausalLM

    from bench.step_vs_trl import SIZES, build_model, prompt_rows
    from grpo.data.prompts import render_prompt
    from grpo.model.experts import experts_implementation
    from grpo.model.tiny import build_char_tokenizer
    from rollout.hf.engine import HFEngine
    from rollout.vllm.engine import VLLMEngine

    device = torch.device(args.device)
    tokenizer = build_char_tokenizer()
    hidden, layers = SIZES[size]
    shapes = [parse_batch(b) for b in args.batch.split(",")]
    rows = prompt_rows(max(p for p, _ in shapes) * (args.warmup + args.reps), seed=2)
    prompts = [tokenizer.encode(render_prompt("r1_zero_tiny", r), add_special_tokens=False) for r in rows]
    threads = sorted({1, 2, args.threads}) if device.type == "cpu" else [args.threads]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grpo-zero-bench-vllm-") as path:
        built = build_model(hidden, layers, tokenizer, None)
        built.config.output_router_logits = False  # neither engine reads router logits when generating
        built.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del built
        experts = experts_implementation(None, device)  # as grpo.model.loading.load_policy picks
        kwargs = {"experts_implementation": experts} if experts else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype), **kwargs)
        model = model.to(device).eval()
        hf = HFEngine(model, tokenizer, device)
        vllm_engine = VLLMEngine(path, dtype=args.dtype, enforce_eager=not args.vllm_compile, seed=0,
                                 kv_cache_memory_bytes=args.kv_cache_mb << 20)
        print(f"generate_vs_vllm: {size}: engines ready in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
        try:
            results = []
            for num_prompts, group in shapes:
                batches = [prompts[i:i + num_prompts] for i in range(0, len(prompts), num_prompts)]  # fresh each rep
                med, reps = measure({"hf": hf, "vllm": vllm_engine}, batches, group, threads, args)
                results.append({
                    "bench": "generate_vs_vllm", "size": size, "hidden": hidden, "layers": layers,
                    "batch": f"{num_prompts}x{group}", "new_tokens": args.new_tokens,
                    **rate_fields(med, threads, args.threads),
                    "hf_fast_decode": hf.fast_decode, "hf_experts": model.config._experts_implementation,
                    "vllm_enforce_eager": not args.vllm_compile, "device": str(device), "dtype": args.dtype,
                    "reps": reps, "loadavg_1m": round(os.getloadavg()[0], 2), "vllm": vllm_version,
                    "torch": torch.__version__,
                })
            return results
        finally:
            vllm_engine.close()


def rate_fields(med: dict[tuple[str, int], float], threads: list[int], at_threads: int) -> dict:
    """Tokens/s of both engines at `at_threads`, each at its best thread count, and all of them."""
    at = {name: med[(name, at_threads)] for name in ENGINES}
    best = {name: max(threads, key=lambda t: med[(name, t)]) for name in ENGINES}
    top = {name: med[(name, best[name])] for name in ENGINES}
    return {
        "hf_tokens_per_s": round(at["hf"], 1), "vllm_tokens_per_s": round(at["vllm"], 1),
        "ratio_hf_over_vllm": round(at["hf"] / at["vllm"], 3), "threads": at_threads,
        "hf_best_tokens_per_s": round(top["hf"], 1), "hf_best_threads": best["hf"],
        "vllm_best_tokens_per_s": round(top["vllm"], 1), "vllm_best_threads": best["vllm"],
        "ratio_best_hf_over_best_vllm": round(top["hf"] / top["vllm"], 3),
        "tokens_per_s_by_threads": {name: {str(t): round(med[(name, t)], 1) for t in threads} for name in ENGINES},
    }


def measure(engines: dict, batches: list, group: int, threads: list[int], args) -> tuple[dict, int]:
    """Median tokens/s per (engine, threads) over the measured repetitions, and how many there were.

    Each repetition times every engine at every thread count once, in an order that reverses every
    repetition. After `args.min_reps` measured repetitions, a repetition that would start past
    `args.budget_s` is not started (a loaded machine then gets fewer repetitions, reported as `reps`).
    """
    from rollout.base import SamplingParams

    device = torch.device(args.device)
    num_prompts, new = len(batches[0]), args.new_tokens

    def timed(name: str, rep: int, nthreads: int) -> float:
        sampling = SamplingParams(max_new_tokens=new, temperature=1.0, ignore_eos=True,
                                  prompt_seeds=tuple(1000 * rep + i for i in range(num_prompts)))
        if name == "vllm" and engines["vllm"].llm.reset_prefix_cache() is False:  # as after a weight update
            raise RuntimeError("vLLM could not reset its prefix cache")
        torch.set_num_threads(nthreads)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = engines[name].generate(batches[rep], group, sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        tokens = sum(len(r.completion_ids) for r in out)
        assert tokens == num_prompts * group * new, (name, tokens)
        return tokens / elapsed

    cells = [(name, t) for t in threads for name in ENGINES]
    rates: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for rep in range(args.warmup):
        for name, t in cells:
            timed(name, rep, t)
    begin = time.perf_counter()
    for i in range(args.reps):
        if i >= args.min_reps and time.perf_counter() - begin > args.budget_s:
            break
        for name, t in cells if i % 2 == 0 else cells[::-1]:
            rates[(name, t)].append(timed(name, args.warmup + i, t))
    return {cell: statistics.median(v) for cell, v in rates.items()}, len(rates[cells[0]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "both"], default="both")
    parser.add_argument("--batch", default="2x8", help="prompts x completions per call; several: 2x8,8x8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="measured repetitions, at most")
    parser.add_argument("--min-reps", type=int, default=3, help="measured repetitions, at least")
    parser.add_argument("--budget-s", type=float, default=45.0,
                        help="measuring seconds per size and batch after which no repetition starts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions (vLLM's first calls are slow)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mb", type=int, default=256, help="vLLM's KV cache (on CPU: RAM)")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="let vLLM compile / capture CUDA graphs (default: enforce_eager, as on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # vLLM logs to stdout by default; stdout here is the JSON lines.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM here"
        reason = f"vLLM cannot be imported: {type(exc).__name__}: {exc}".splitlines()[0]
        print(f"generate_vs_vllm: skipped, {reason}", file=sys.stderr, flush=True)
        print(json.dumps({"bench": "generate_vs_vllm", "skipped": reason}), flush=True)
        return 0

    import transformers

    transformers.logging.set_verbosity_error()
    for size in (["tiny", "small"] if args.size == "both" else [args.size]):
        for result in run(size, args, vllm.__version__):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
