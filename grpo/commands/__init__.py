"""The bodies of the verbs besides training:

- `grpo.commands.plan`: `grpo plan`, memory, time and cost of a recipe on a cluster;
- `grpo.commands.toy`: `grpo train RECIPE --toy`, any recipe at toy scale on a laptop CPU;
- `grpo.commands.score`: `grpo score`, a file of completions scored offline in the sandbox;
- `grpo.commands.fetch`: `grpo fetch`, a real pretrained model into the cache, once per machine.

May import: `grpo.run`, `grpo.model`, `grpo.algo`, `grpo.data` and the bottom floor; `rewards`, `rollout`.
"""
