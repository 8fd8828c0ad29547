"""The objective as tensor code, in the order a batch of scored rollouts travels:

- `grpo.algo.dynamic_sampling`: DAPO's dynamic sampling, which groups to keep (informative ones);
- `grpo.algo.advantages`: group-relative advantages over the global `[P, G]` rewards, and DAPO's
  soft overlong penalty added to the reward before them;
- `grpo.algo.logprobs`: per-token log-probs and entropy under the policy, chunked, with shared-prompt
  forwards;
- `grpo.algo.packing`: padding-free forwards, a micro-batch's sequences packed into one row with
  attention kept within each, and micro-batches cut by a token budget;
- `grpo.algo.loss`: the GRPO loss family as small pure functions, chosen once from the recipe;
- `grpo.algo.moe`: routing replay, float32 routers, the aux loss and expert-load metrics;
- `grpo.algo.update`: one policy update: micro-batches, accumulation, the optimizer step.

May import: the bottom floor (`grpo.config`, `grpo.collectives`, `grpo.errors`, `grpo.hub`),
`rollout` (records, KV-cache helpers) and `rewards`; nothing else in `grpo`.
"""
