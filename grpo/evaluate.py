"""Evaluation on held-out prompts."""

from __future__ import annotations

from grpo.config import RunConfig
from grpo.data import render_prompt
from rewards import RewardSpec, Scorer
from rollout.base import SamplingParams


EVAL_REWARDS = [RewardSpec("math_answer"), RewardSpec("format")]


def evaluate_greedy(engine, tokenizer, cfg: RunConfig, rows: list[dict], scorer: Scorer) -> dict:
    """Greedy accuracy on held-out rows: correct answer *inside* the required format."""
    prompts = [render_prompt(cfg.data.template, row) for row in rows]
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    sampling = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                              temperature=0.0, stop=tuple(cfg.rollout.stop))
    outs = engine.generate(prompt_ids, 1, sampling)
    result = scorer.score([o.text for o in outs], rows, [{"prompt": p} for p in prompts])
    correct = [m == 1.0 and f == 1.0 for m, f in zip(result.per_function["math_answer"], result.per_function["format"])]
    return {
        "accuracy": sum(correct) / len(correct),
        "format": sum(f == 1.0 for f in result.per_function["format"]) / len(correct),
        "answer_anywhere": sum(m == 1.0 for m in result.per_function["math_answer"]) / len(correct),
        "num_prompts": len(rows),
        "examples": [{"prompt": p, "completion": o.text, "answer": r["answer"]} for p, o, r in list(zip(prompts, outs, rows))[:3]],
    }
