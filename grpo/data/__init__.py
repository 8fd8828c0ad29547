"""Rows and prompts, in the order a problem travels:

- `grpo.data.tasks`: built-in synthetic tasks (arithmetic, sums, countdown), generated from a seed;
- `grpo.data.gym`: `reasoning_gym:<task>` sources, problems a reasoning-gym task generates, carrying
  the entry its own checker scores (the `reasoning_gym` reward);
- `grpo.data.sources`: rows from a task, a local file, a `datasets` directory or a Hub data set,
  checked field by field (`DataError` names the file and row), split into training and held out;
- `grpo.data.prompts`: templates that turn a row into the text the policy continues, and the
  seeded `PromptSampler` that draws rows, epoch after epoch.

May import: the bottom floor (`grpo.config`, `grpo.collectives`, `grpo.errors`, `grpo.hub`) only.
"""
