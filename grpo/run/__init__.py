"""One training job, in the order it runs:

- `grpo.run.launch`: `grpo train` re-run under `accelerate launch` with a config file;
- `grpo.run.processes`: the Accelerator, FSDP2 on CPU, what several processes cannot run yet;
- `grpo.run.step`: one step as a unit: `collect_rollouts` (the sampling half: prompts, generation,
  rewards) then `learn` (advantages, the update, the weight push, the step's metrics);
- `grpo.run.async_rollouts`: asynchronous RL: the sampling half in a generation process, k steps ahead;
- `grpo.run.evaluate`: held-out evaluation (greedy accuracy, avg@k, pass@k, maj@k);
- `grpo.run.tracking`: metrics and rollouts to `metrics.jsonl` and the experiment trackers;
- `grpo.run.checkpoint`: atomic checkpoints and exact resume;
- `grpo.run.train`: set-up, the loop around the step, stopping and finishing.

May import: `grpo.model`, `grpo.algo`, `grpo.data` and the bottom floor; `rewards`, `rollout`.
"""
