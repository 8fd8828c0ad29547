"""Generation alone: the HF engine's completion tokens/s over plain `model.generate`, same run.

CPU (what `make bench` runs):
    python bench/generate_vs_hf.py [--size tiny|small] [--threads 2] [--reps 15]
GPU: python bench/generate_vs_hf.py --device cuda --dtype bfloat16

Same model object (the tiny random-init Qwen3-MoE of bench/step_vs_trl.py, built locally; the
experts kernel is transformers' default for the device unless --experts says otherwise), same batch
(2 prompts x 8 completions, left-padded), same sampling (temperature 1, no top-k / top-p, exactly
32 new tokens: our `ignore_eos`, `min_new_tokens=32` for `generate`), both under
`torch.inference_mode`, `generate` with router logits off (transformers 5.24's `generate` fails
with them on for this model). Repetitions alternate between the two; medians are reported with
the 1-minute load average. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--experts", default=None, help="experts kernel (default: transformers' choice)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from bench.step_vs_trl import SIZES, build_model, prompt_rows
    from grpo.data.prompts import render_prompt
    from grpo.model.tiny import build_char_tokenizer
    from rollout.base import SamplingParams
    from rollout.hf.engine import HFEngine

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    tokenizer = build_char_tokenizer()
    hidden, layers = SIZES[args.size]
    model = build_model(hidden, layers, tokenizer, args.experts).to(device, getattr(torch, args.dtype)).eval()
    prompts = [tokenizer.encode(render_prompt("r1_zero_tiny", r), add_special_tokens=False) for r in prompt_rows(2)]
    group, new = 8, args.new_tokens
    engine = HFEngine(model, tokenizer, device)
    sampling = SamplingParams(max_new_tokens=new, temperature=1.0, ignore_eos=True)

    rows = [p for p in prompts for _ in range(group)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)

    def ours() -> int:
        out = engine.generate(prompts, group, sampling)
        return sum(len(r.completion_ids) for r in out)

    def plain() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 output_router_logits=False)
        return (out.shape[1] - width) * out.shape[0]

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert tokens == len(rows) * new, tokens
        return tokens / (time.perf_counter() - t)

    rates: dict[str, list[float]] = {"ours": [], "generate": []}
    for rep in range(args.warmup + args.reps):
        order = [("ours", ours), ("generate", plain)] if rep % 2 == 0 else [("generate", plain), ("ours", ours)]
        for name, fn in order:
            rate = timed(fn)
            if rep >= args.warmup:
                rates[name].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({
        "bench": "generate_vs_hf", "size": args.size, "batch": f"2x{group}", "new_tokens": new,
        "ours_tokens_per_s": round(med["ours"], 1), "generate_tokens_per_s": round(med["generate"], 1),
        "ratio_ours_over_generate": round(med["ours"] / med["generate"], 3),
        "fast_decode": engine.fast_decode, "experts": model.config._experts_implementation,
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "reps": args.reps,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
