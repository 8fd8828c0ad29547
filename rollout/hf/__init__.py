"""The transformers rollout engine (`HFEngine`), one job per module, in the order a token travels:

- `rollout.hf.steppers`: the prompt prefill through the model's own forward (each distinct prompt
  once), the KV-cache helpers (`cache_keyword`, `output_cache`) and the generic decode step;
- `rollout.hf.qwen3`: the hand-written decode step of Qwen3 / Qwen3-MoE (static KV buffer, dense
  experts at small batch), used in place of the generic one when the model is one;
- `rollout.hf.sampling`: the distribution each token is drawn from (temperature, top-k, top-p),
  its log-probabilities and the draw;
- `rollout.hf.stops`: which rows have finished (EOS, stop ids, stop strings);
- `rollout.hf.routing`: the routed experts of every token (MoE routing replay);
- `rollout.hf.engine`: `HFEngine`, the decode loop and the per-row records (`Rollout`).

Imports: `sampling`, `stops`, `routing` and `qwen3` import only torch and `rollout.base`; `steppers`
adds `routing`; `engine` imports them all. No module imports `engine` or this package's door, and
nothing here imports `grpo`, `rewards` or vLLM.
"""

from rollout.hf.engine import HFEngine
from rollout.hf.steppers import cache_keyword, output_cache

__all__ = ["HFEngine", "cache_keyword", "output_cache"]
