"""LoRA against full weights: the trainer's peak memory and step time, and the weight push to vLLM
as an adapter against the merged weights.

CPU (what `make bench` runs):
    python bench/lora.py                     # both parts, one JSON line each
    python bench/lora.py --part train        # step time and peak memory only
    python bench/lora.py --part push --rank 16
GPU: not meant for one (see bench/gpu_check.sh).

Part `train`: the `small` model of bench/step_vs_trl.py (random-init Qwen3-MoE, hidden 512, 8
layers, 8 experts top-2, float32, its character tokenizer) runs whole GRPO steps
(`grpo.run.step.run_step`: 2 prompts x 8 completions x 32 tokens, the transformers engine, the
update, AdamW) with full weights and with LoRA (rank `--rank` on every decoder linear layer, the
defaults of `model.lora`). Each side runs in its own process, in turns (`--rounds`), so the peak
resident memory (`ru_maxrss`) is that side's own; step times are medians after 3 warm-up steps.

Part `push`: a dense Qwen3 of the same size (hidden 512, 8 layers, head_dim 64: vLLM's CPU attention
takes it) saved locally, a colocated vLLM engine (CPU build, float32) started with LoRA, an adapter
trained by one AdamW step; `grpo.run.step.sync_engine` pushes it as an adapter
(`model.lora.sync: adapter`: PEFT files in /dev/shm, a new vLLM adapter version), then a second
engine without LoRA receives the merged weights (`model.lora.sync: merged`: base + B A, computed and
reloaded in place). Medians of `--pushes` pushes each, every push timed from the trainer's module
to vLLM holding the new version.

Ratios reported: full / LoRA for step time and peak memory, merged / adapter for the push.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WARMUP, STEPS = 3, 10


def train_side(lora_rank: int | None, steps: int) -> dict:
    """Whole steps of one side in this process: median seconds and this process's peak RSS."""
    from bench.step_vs_trl import SIZES, OurStep

    torch.set_num_threads(2)
    hidden, layers = SIZES["small"]
    step = OurStep(hidden, layers, lora={"rank": lora_rank} if lora_rank else None)
    trainable = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
    times = [step() for _ in range(WARMUP + steps)][WARMUP:]
    return {"trainable_params": trainable,
            "step_s": statistics.median(t["step"] for t in times), "train_s": statistics.median(t["train"] for t in times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def train_part(rank: int, rounds: int, steps: int) -> dict:
    sides: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(rounds):
        for name in sides:
            cmd = [sys.executable, __file__, "--child", name, "--rank", str(rank), "--steps", str(steps)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            sides[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in sides.items()}
    return {"part": "train", "model": "small (Qwen3-MoE hidden 512, 8 layers)", "rank": rank, **{
        f"{name}_{k}": round(v, 4) for name, m in med.items() for k, v in m.items()},
        "step_time_ratio_full_over_lora": round(med["full"]["step_s"] / med["lora"]["step_s"], 3),
        "train_time_ratio_full_over_lora": round(med["full"]["train_s"] / med["lora"]["train_s"], 3),
        "peak_memory_ratio_full_over_lora": round(med["full"]["peak_rss_mb"] / med["lora"]["peak_rss_mb"], 3)}


def push_part(rank: int, pushes: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from grpo.config import LoRAConfig
    from grpo.model.lora import apply_lora
    from grpo.model.tiny import build_char_tokenizer
    from grpo.run.step import sync_engine
    from rollout.vllm.engine import VLLMEngine

    tok = build_char_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as path:
        base.save_pretrained(path)
        tok.save_pretrained(path)
        model = apply_lora(base, LoRAConfig(rank=rank))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = torch.randint(3, len(tok), (2, 32))
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = {}
        for sync, lora_rank in (("adapter", rank), ("merged", None)):
            engine = VLLMEngine(path, dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=32 << 20,
                                lora_rank=lora_rank)
            try:
                times = []
                for _ in range(pushes + 1):  # the first push is a warm-up
                    t = time.perf_counter()
                    sync_engine(engine, model, model, sync)
                    times.append(time.perf_counter() - t)
                seconds[sync] = statistics.median(times[1:])
            finally:
                engine.close()
    total = sum(p.numel() for p in base.parameters())
    return {"part": "push", "model": "dense Qwen3 hidden 512, 8 layers (vLLM CPU build, float32)", "rank": rank,
            "model_params": total, "adapter_params": adapter_params,
            "adapter_push_s": round(seconds["adapter"], 4), "merged_push_s": round(seconds["merged"], 4),
            "push_ratio_merged_over_adapter": round(seconds["merged"] / seconds["adapter"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["train", "push", "both"], default="both")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="train part: turns of full and LoRA processes")
    parser.add_argument("--steps", type=int, default=STEPS, help="train part: timed steps per process")
    parser.add_argument("--pushes", type=int, default=5, help="push part: timed pushes per kind")
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_side(args.rank if args.child == "lora" else None, args.steps)))
        return 0
    if args.part in ("train", "both"):
        print(json.dumps(train_part(args.rank, args.rounds, args.steps)), flush=True)
    if args.part in ("push", "both"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(json.dumps(push_part(args.rank, args.pushes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
