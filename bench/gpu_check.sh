#!/usr/bin/env bash
# GPU check of the rollout engines and the training step, on one CUDA GPU, nothing downloaded.
#
#   bash bench/gpu_check.sh            # from the repository root; python3 needs torch + transformers
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Models are built from configs (the tiny Qwen3-MoE of bench/step_vs_trl.py and its `small` size)
# with the local character-level tokenizer. Parts, each under its own timeout (about 7 minutes for
# parts 1-2, 5-10 more for part 3; the timeouts add up to about 40):
#   1. HF engine, CUDA bf16: completion tokens/s of the engine vs model.generate (tiny and small), and
#      the engine's logprobs against a teacher-forced forward (bf16, so the tolerance is loose).
#   2. Training steps, CUDA bf16, HF engine: step time split generate/score/train/sync and tokens/s
#      (2 prompts x 8 x 32 tokens, then 8 prompts x 8 x 128 tokens).
#   3. If `import vllm` works (and vLLM's platform is the device's; anything else fails):
#      3a. the real-engine tests, run on the device: tests/rollout/test_vllm_colocated.py (float32 logprobs
#          against a teacher-forced transformers forward to 1e-4 after three real optimizer-step
#          updates, dense tied/untied and MoE tied/untied, temperature 1 and top-k; a half update is
#          an error; per-prompt seeds; greedy; engine start/close keep the trainer's RNG, threads
#          and process group; 1 vs 2 processes only with 2+ GPUs, as external_launcher puts rank r
#          on device r) and tests/rollout/test_vllm_server.py (a vLLM server on the device, logprobs after
#          pushed updates, failed pushes; its NCCL test needs 2 GPUs). Float32, no TF32
#          (VLLM_FLOAT32_MATMUL_PRECISION=highest), so the CPU tolerances hold.
#      3b. tokens/s, HF engine vs vLLM (bench/generate_vs_vllm.py, bf16, CUDA graphs on a GPU), tiny
#          and small, 2 x 8 and 8 x 8 completions of 32 tokens.
#      3c. training steps with the colocated vLLM engine on a saved tiny checkpoint (bf16): sleep/wake
#          and weight sync, with the same split as part 2.
# Exits non-zero when a part fails or times out; part 3 is skipped (not failed) without vLLM.
#
#   GPU_CHECK_PARTS="3" bash bench/gpu_check.sh    # only some parts (default "1 2 3")
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
# GPU_CHECK_DEVICE=cpu runs the same script on a CPU (a dry run of the script itself, slow in bf16).
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
GPU_CHECK_PARTS="${GPU_CHECK_PARTS:-1 2 3}"
part() { [[ " ${GPU_CHECK_PARTS} " == *" $1 "* ]]; }
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

if part 1; then
say "1. HF engine on CUDA, bf16: tokens/s vs model.generate"
for size in tiny small; do
  timeout 120 "$PYTHON" bench/generate_vs_hf.py --device "$GPU_CHECK_DEVICE" --dtype bfloat16 --size "$size" --reps 5 --threads 4
done

say "1b. HF engine logprobs vs teacher-forced forward (CUDA bf16)"
timeout 90 "$PYTHON" - <<'EOF'
import os, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import build_model
from grpo.model.tiny import build_char_tokenizer
from rollout.base import SamplingParams
dev = os.environ["GPU_CHECK_DEVICE"]
from rollout.hf.engine import HFEngine
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
fi

STEPS_PY='
import json, os, statistics, sys, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import OurStep
engine, size, P, G, N, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
ckpt = sys.argv[7] if len(sys.argv) > 7 else None
hidden, layers = {"tiny": (128, 4), "small": (512, 8)}[size]
# max_model_len: the tiny models have 256 positions (vLLM refuses a longer one)
vllm = {"gpu_memory_utilization": 0.3, "max_model_len": 256, "dtype": "bfloat16"} if engine == "vllm" else None
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

if part 2; then
say "2. training steps on CUDA, bf16, HF engine (split: generate / score / train / sync)"
timeout 75 "$PYTHON" -c "$STEPS_PY" hf tiny 2 8 32 8
timeout 100 "$PYTHON" -c "$STEPS_PY" hf small 8 8 128 6
fi

if part 3; then
say "3. vLLM engine (colocated) on $GPU_CHECK_DEVICE"
if timeout 120 "$PYTHON" -c "import vllm; print('vllm', vllm.__version__)"; then
  timeout 120 "$PYTHON" - <<'EOF'
import os, sys
from vllm.platforms import current_platform
want = os.environ["GPU_CHECK_DEVICE"]
print("vLLM platform:", current_platform.device_type)
if current_platform.device_type != want:
    sys.exit(f"FAIL: vLLM's platform is {current_platform.device_type!r}, not {want!r} (a CPU build on a GPU machine?)")
EOF

  say "3a. vLLM engine tests on $GPU_CHECK_DEVICE (float32: logprobs after real updates, seeds, close)"
  deselect=()
  if [ "$GPU_CHECK_DEVICE" = cuda ] && [ "$(timeout 60 "$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    deselect=(--deselect tests/rollout/test_vllm_colocated.py::test_one_and_two_processes_sample_identical_rollouts)
    echo "one GPU: the 1 vs 2 processes test is deselected (vLLM's external_launcher puts rank r on device r)"
  fi
  GRPO_ZERO_REQUIRE_VLLM=1 VLLM_FLOAT32_MATMUL_PRECISION=highest timeout 900 \
    "$PYTHON" -m pytest tests/rollout/test_vllm_colocated.py tests/rollout/test_vllm_server.py -q -p no:cacheprovider \
    ${deselect[@]+"${deselect[@]}"}

  say "3b. tokens/s: HF engine vs vLLM, bf16 (bench/generate_vs_vllm.py)"
  if [ "$GPU_CHECK_DEVICE" = cuda ]; then
    bench_args=(--size both --reps 5 --threads 4 --vllm-compile)  # CUDA graphs: how vLLM runs on a GPU
  else
    bench_args=(--size tiny --reps 1 --min-reps 1)  # the dry run: the code path, not a measurement
  fi
  timeout 420 "$PYTHON" bench/generate_vs_vllm.py --device "$GPU_CHECK_DEVICE" --dtype bfloat16 --batch 2x8,8x8 \
    "${bench_args[@]}"

  say "3c. training steps with the colocated vLLM engine, bf16 (sleep/wake, weight sync)"
  timeout 60 "$PYTHON" - "$WORK/tiny" <<'EOF'
import sys, torch, transformers
transformers.logging.set_verbosity_error()
from bench.step_vs_trl import build_model
from grpo.model.tiny import build_char_tokenizer
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
fi

say "gpu_check: parts ${GPU_CHECK_PARTS} passed"
