"""Peak memory of chunked log-probs (grpo/algo/logprobs.py) against the plain full-logits log_softmax.

    python bench/logprob_memory.py            # both variants, each in its own process; one JSON line
    python bench/logprob_memory.py --chunk 256 --threads 2

Setting (the issue's): batch 2, sequence 4096, vocabulary 151936 (Qwen's), hidden 1024, CPU float32.
The model is a one-layer Qwen3 with tied embeddings built from a config (random weights, fixed seed):
the decoder's cost is small next to the [2, 4096, 151936] logits (5 GB in float32; log_softmax
doubles it). Each variant runs in a fresh subprocess and reports its peak resident set size
(`resource.getrusage`, ru_maxrss) and, for reference, the RSS after the model is built; the parent
compares the two log-prob tensors and prints one JSON line:

    {"plain_peak_mb", "chunked_peak_mb", "ratio" (chunked / plain, at most 0.25 to pass),
     "max_abs_diff" (at most 1e-5 to pass), "chunk", "model_rss_mb", "seconds", "pass"}

Both variants run under torch.no_grad (the plain one with grad would need well over 15 GB here);
grpo/algo/logprobs.py applies activation checkpointing per chunk, so backward memory is bounded by the
same chunk (tests/grpo/algo/test_logprobs.py checks that autograd saves no full-size logits; `--backward`
also measures the chunked forward + backward, "chunked_fwd_bwd_peak_mb"). Exit status 1 if a
bound is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ, VOCAB, HIDDEN = 2, 4096, 151936, 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, chunk: int, out: str, threads: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from grpo.algo.logprobs import token_logprobs, token_logprobs_plain

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2048, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=SEQ)
    model = Qwen3ForCausalLM(config).eval()
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))  # [B, S]
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)  # [B, S]
    model_rss = rss_mb()
    start = time.perf_counter()
    if variant == "chunked_backward":  # forward with autograd, then backward through the checkpointed chunks
        logprobs, _ = token_logprobs(model, input_ids, attention_mask, with_entropy=True, chunk=chunk)  # [B, S-1]
        logprobs.sum().backward()
        logprobs = logprobs.detach()  # [B, S-1]
    else:
        with torch.no_grad():
            if variant == "plain":
                logprobs = token_logprobs_plain(model, input_ids, attention_mask)  # [B, S-1]
            else:
                logprobs, _ = token_logprobs(model, input_ids, attention_mask, with_entropy=True, chunk=chunk)
    seconds = time.perf_counter() - start
    torch.save(logprobs, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    print(json.dumps({"peak_mb": peak, "model_rss_mb": model_rss, "seconds": seconds}))


def measure(variant: str, chunk: int, out: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--chunk", str(chunk), "--out", out,
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} variant failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["plain", "chunked", "chunked_backward"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=256, help="sequence positions per chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per variant")
    parser.add_argument("--backward", action="store_true",
                        help="also measure the chunked forward + backward (reported, not part of the ratio)")
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.chunk, args.out, args.threads)
        return 0

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        chunked = measure("chunked", args.chunk, f"{tmp}/chunked.pt", args.threads)
        plain = measure("plain", args.chunk, f"{tmp}/plain.pt", args.threads)
        diff = (torch.load(f"{tmp}/chunked.pt") - torch.load(f"{tmp}/plain.pt")).abs().max().item()
        backward = measure("chunked_backward", args.chunk, f"{tmp}/backward.pt", args.threads) if args.backward else None
    ratio = chunked["peak_mb"] / plain["peak_mb"]
    ok = ratio <= 0.25 and diff <= 1e-5
    print(json.dumps({"plain_peak_mb": round(plain["peak_mb"], 1), "chunked_peak_mb": round(chunked["peak_mb"], 1),
                      "ratio": round(ratio, 4), "max_abs_diff": diff, "chunk": args.chunk,
                      "model_rss_mb": round(plain["model_rss_mb"], 1),
                      "seconds": {"plain": round(plain["seconds"], 1), "chunked": round(chunked["seconds"], 1)},
                      **({"chunked_fwd_bwd_peak_mb": round(backward["peak_mb"], 1)} if backward else {}),
                      "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
