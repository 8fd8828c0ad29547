"""grpo-zero: R1-Zero-style reinforcement learning (GRPO and relatives) for dense and MoE models.

The package is built in floors; a file's folder says what it may import (each floor only those
below it, never one beside it or above it; `tests/test_code_shape.py` checks every import):

    cli.py, __main__.py   the `grpo` verbs: parse, then call one function       may import everything below
    commands/, dashboard/ the verbs' bodies besides training (plan, toy scale,   run, model, algo, data, bottom
                          offline scoring); the dashboard reads run directories
    run/                  one training job: processes, launching, the step, the  model, algo, data, bottom
                          asynchronous generation process, checkpoints, tracking,
                          evaluation, the loop
    model/                what a run trains: loading the policy and reference,   data, bottom
                          the optimizer and schedule, the CPU experts kernel,
                          the built-in tiny bases
    algo/                 pure tensor code of the objective: advantages, loss,   bottom
                          log-probs, the update, MoE routing, dynamic sampling
    data/                 rows and prompts: built-in tasks, sources, templates,  bottom
                          the prompt sampler
    bottom: config.py (the typed recipe), collectives.py (in-job all-reduce and    nothing in grpo/ above
            seeds), errors.py (the user-error boundary), hub.py (is the Hub there?)

Beside grpo/, `rewards/` and `rollout/` import nothing from grpo/ or from each other; every floor
may use them.
"""
