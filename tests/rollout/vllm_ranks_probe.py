"""Run by tests/rollout/test_vllm_colocated.py under torchrun (or alone): each rank samples its share of the
prompts with the colocated vLLM engine; rank 0 writes every rank's rollouts to a JSON file."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, out_path: str) -> None:
    from grpo.collectives import rank_slice
    from rollout.base import SamplingParams
    from rollout.vllm.engine import VLLMEngine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(1000 + rank)  # ranks' global RNGs differ, as after real training steps
    prompts = [[5 + i, 6 + i, 7, 8 + 2 * i] for i in range(6)]
    seeds = [10_007 * (i + 1) for i in range(len(prompts))]
    mine = rank_slice(len(prompts), rank, world)
    engine = VLLMEngine(model_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=32 << 20)
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_seeds=tuple(seeds[mine]))
    rollouts = engine.generate(prompts[mine], 4, sampling)
    rows = [{"prompt": mine.start + r.group, "ids": list(r.completion_ids), "logprobs": list(r.logprobs)}
            for r in rollouts]
    shares = [rows]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, rows)
    engine.close()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([row for share in shares for row in share], f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
