#!/usr/bin/env bash
# GPU check of the rollout engines and the training step, on one CUDA GPU, nothing downloaded.
#
#   bash bench/gpu_check.sh            # from the repository root; python3 needs torch + transformers
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Models are built from configs (the tiny Qwen3-MoE of bench/step_vs_trl.py and its `small` size)
# with the local character-level tokenizer. Parts, each under its own timeout (about 7 minutes in all):
#   1. HF engine, CUDA bf16: completion tokens/s of the engine vs model.generate (tiny and small), and
#      the engine's logprobs against a teacher-forced forward (bf16, so the tolerance is loose).
#   2. Training steps, CUDA bf16, HF engine: step time split generate/score/train/sync and tokens/s
#      (2 prompts x 8 x 32 tokens, then 8 prompts x 8 x 128 tokens).
#   3. If `import vllm` works: the vLLM engine colocated (rollout/vllm.py) on a saved tiny checkpoint:
#      tokens/s, and training steps with sleep/wake and weight sync, with the same split.
# Exits non-zero when a part fails or times out; part 3 is skipped (not failed) without vLLM.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
# GPU_CHECK_DEVICE=cpu runs the same script on a CPU (a dry run of the script itself, slow in bf16).
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

say() { printf '\n=== %s ===\n' "$*"; }

say "environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 120 "$PYTHON" - <<'EOF'
import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__)
import os
if os.environ["GPU_CHECK_DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("FAIL: torch sees no CUDA device")
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
import grpo, rollout, rewards  # the project imports from the checkout
EOF

say "1. HF engine on CUDA, bf16: tokens/s vs model.generate"
for size in tiny small; do
  timeout 120 "$PYTHON" bench/generate_vs_hf.py --device "$GPU_CHECK_DEVICE" --dtype bfloat16 --size "$size" --reps 5 --threads 4
done

say "1b. HF engine logprobs vs teacher-forced forward (CUDA bf16)"
timeout 90 "$PYTHON" - <<'EOF'
import os, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import build_model
from grpo.tiny import build_char_tokenizer
from rollout.base import SamplingParams
dev = os.environ["GPU_CHECK_DEVICE"]
from rollout.hf import HFEngine
tok = build_char_tokenizer()
model = build_model(128, 4, tok, None).to(dev, torch.bfloat16).eval()
prompts = [tok.encode("User: 12+3=?\nAssistant:"), tok.encode("9+9=")]
for fast in (True, False):
    out = HFEngine(model, tok, fast_decode=fast).generate(prompts, 4, SamplingParams(32, seed=0, ignore_eos=True, record_routing=True))
    worst = 0.0
    for r in out:
        seq = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)], device=dev)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq, output_router_logits=False).logits[0].float(), -1)
        start = len(r.prompt_ids) - 1
        tf = lp[start:start + len(r.completion_ids)].gather(-1, seq[0, start + 1:, None]).squeeze(-1)
        worst = max(worst, (tf.cpu() - torch.tensor(r.logprobs)).abs().max().item())
        assert r.routed_experts.shape[0] == len(r.prompt_ids) + len(r.completion_ids) - 1
    print(f"fast_decode={fast}: max |engine - teacher-forced| logprob = {worst:.4f} (bf16)")
    assert worst < 0.25, "engine logprobs far from the teacher-forced forward"
print("ok")
EOF

STEPS_PY='
import json, os, statistics, sys, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import OurStep
engine, size, P, G, N, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
ckpt = sys.argv[7] if len(sys.argv) > 7 else None
hidden, layers = {"tiny": (128, 4), "small": (512, 8)}[size]
vllm = {"gpu_memory_utilization": 0.3, "max_model_len": 512, "dtype": "bfloat16"} if engine == "vllm" else None
step = OurStep(hidden, layers, device=os.environ["GPU_CHECK_DEVICE"], dtype=torch.bfloat16, engine=engine, checkpoint=ckpt,
               prompts_per_step=P, group=G, new_tokens=N, vllm=vllm)
splits = [step() for _ in range(steps)]
keep = splits[2:] if len(splits) > 3 else splits
med = {k: round(statistics.median(s[k] for s in keep), 4) for k in keep[0]}
print(json.dumps({"part": "train_steps", "engine": engine, "size": size, "batch": f"{P}x{G}x{N}",
                  "steps": steps, "median_s": med, "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}))
if hasattr(step.engine, "close"):
    step.engine.close()
'

say "2. training steps on CUDA, bf16, HF engine (split: generate / score / train / sync)"
timeout 75 "$PYTHON" -c "$STEPS_PY" hf tiny 2 8 32 8
timeout 100 "$PYTHON" -c "$STEPS_PY" hf small 8 8 128 6

say "3. vLLM engine (colocated)"
if timeout 120 "$PYTHON" -c "import vllm; print('vllm', vllm.__version__)"; then
  timeout 60 "$PYTHON" - "$WORK/tiny" <<'EOF'
import sys, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import build_model
from grpo.tiny import build_char_tokenizer
tok = build_char_tokenizer()
model = build_model(128, 4, tok, None)
model.config.output_router_logits = False
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
print("saved", sys.argv[1])
EOF
  timeout 200 "$PYTHON" -c "$STEPS_PY" vllm tiny 8 8 64 6 "$WORK/tiny"
else
  echo "vLLM not importable here: part 3 skipped"
fi

say "gpu_check: all parts passed"
