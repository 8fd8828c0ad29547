"""What a run trains, in the order it is set up:

- `grpo.model.cache`: the per-machine cache of built and fetched models, written atomically;
- `grpo.model.tiny`: the built-in tiny bases (`builtin:NAME`), a character tokenizer and a tiny
  Qwen3-MoE pretrained here on synthetic text, built once and cached;
- `grpo.model.pretrained`: real pretrained models without the Hub: SmolLM2-135M-Instruct fetched
  from the package registry (`builtin:smollm2-135m-instruct`), and any `.gguf` file, converted once
  into a transformers checkpoint in the cache;
- `grpo.model.experts`: the `grpo_sorted` experts kernel for MoE training on CPU;
- `grpo.model.loading`: the policy and its tokenizer (built-in, GGUF file, Hub id or local directory;
  `ModelError` names what cannot be loaded), and the frozen reference;
- `grpo.model.optim`: AdamW and the learning-rate schedule.

May import: `grpo.data` (the tiny bases' corpora come from its tasks) and the bottom floor.
"""
