"""Evaluation on held-out problems: greedy accuracy, avg@k, unbiased pass@k and maj@k, per data set.

A completion is *correct* when every reward named in `eval.correct` scores 1.0 on it; by default
(`grpo.data.prompts.correct_rewards`) the source's answer reward (`math_answer`, `countdown`,
`reasoning_gym`), with `format` when the template asks for the R1 tags: the right answer inside the
required format. A `\\boxed{}` template is judged on the answer alone. Reports name these rewards. The same definition serves the training summary, `eval.every` during
training and `grpo eval`, so their numbers can be compared.

    grpo eval recipes/tiny-cpu.yaml --checkpoint runs/x/final            # CPU, greedy
    grpo eval recipes/qwen2.5-math-7b-zero.yaml --checkpoint ckpt --k 8  # GPU, 8 samples a problem

Metrics (per data set, n = eval.k samples a problem at eval.temperature):
- greedy_accuracy: share of problems whose greedy (temperature 0) completion is correct;
- avg@n: mean share of correct samples (the pass@1 estimate from n samples);
- pass@k for k = 1, 2, 4, ... <= n: the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al.
  (arXiv 2107.03374), computed as a product so large n cannot overflow;
- maj@n: the most frequent final answer among the n samples (ties: the first seen) is correct.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from grpo.config import RolloutConfig, RunConfig
from grpo.data.prompts import correct_rewards, render_prompts
from grpo.run.checkpoint import write_atomic
from rewards import RewardSpec, Scorer, is_correct
from rewards.format import answer_block
from rollout.base import SamplingParams


def make_eval_scorer(cfg: RunConfig) -> Scorer:
    """A scorer of the rewards that define correctness, sandboxed like the training rewards."""
    r = cfg.rewards
    return Scorer([RewardSpec(name, 1.0, r.kwargs_for(name)) for name in correct_rewards(cfg.data, cfg.eval)],
                  workers=r.workers, timeout_s=r.timeout_s, memory_mb=r.memory_mb)


# --- estimators ---------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), a product of numbers in [0, 1].

    >>> pass_at_k(4, 1, 2)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    >>> pass_at_k(10, 0, 5), pass_at_k(10, 7, 5)
    (0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def final_answer(text: str) -> str | None:
    """The answer a completion commits to, for voting: the last `<answer>` contents, else the last
    `\\boxed{...}`; whitespace removed. None when there is neither.

    >>> final_answer("<think>..</think><answer> 1 + 2 </answer>"), final_answer("so \\\\boxed{\\\\frac{1}{2}}.")
    ('1+2', '\\\\frac{1}{2}')
    """
    inner = answer_block(text)
    if inner is not None:
        return "".join(inner.split()) or None
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return "".join(text[i + 1 : j].split()) or None
    return None


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@n for one problem: the most frequent answer (ties: the first seen) is correct when any
    sample that gave it was judged correct. Samples without an answer do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


# --- scoring ------------------------------------------------------------------------------------


def judge(scorer: Scorer, correct: Sequence[str], completions: list[str], rows: list[dict],
          prompts: list[str]) -> tuple[list[bool], dict]:
    """(correct per completion, per-function scores)."""
    result = scorer.score(completions, rows, [{"prompt": p} for p in prompts])
    per = result.per_function
    return [is_correct({name: values[i] for name, values in per.items()}, correct) for i in range(len(completions))], per


def _generate(engine, tokenizer, rollout: RolloutConfig, prompt_ids: list[list[int]], rows: list[dict], n: int,
              sampling: SamplingParams, environment=None):
    """The engine's completions, multi-turn with `environment` (the recipe's tools) when there is one."""
    if environment is None:
        return engine.generate(prompt_ids, n, sampling)
    from grpo.run.tools import episodes_for

    episodes = episodes_for(rollout, environment, tokenizer, rows, n, sampling.max_new_tokens)
    return engine.generate(prompt_ids, n, sampling, episodes=episodes)


def evaluate_greedy(engine, tokenizer, cfg: RunConfig, rows: list[dict], scorer: Scorer, environment=None) -> dict:
    """Greedy accuracy on held-out rows: correct answer *inside* the required format (with the
    recipe's tools when `environment` is given)."""
    prompts = render_prompts(cfg.data, rows, tokenizer)
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    sampling = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                              temperature=0.0, stop=tuple(cfg.rollout.stop))
    outs = _generate(engine, tokenizer, cfg.rollout, prompt_ids, rows, 1, sampling, environment)
    names = correct_rewards(cfg.data, cfg.eval)
    correct, per = judge(scorer, names, [o.text for o in outs], rows, prompts)
    n = len(rows)
    summary = {"accuracy": sum(correct) / n, "correct": names}
    if "format" in per:
        summary["format"] = sum(f == 1.0 for f in per["format"]) / n
    answer_name = next((name for name in names if name != "format"), None)
    if answer_name:
        summary["answer_anywhere"] = sum(v == 1.0 for v in per[answer_name]) / n
    summary["num_prompts"] = n
    if environment is not None:
        summary["tool_calls"] = sum(o.tool_calls for o in outs) / n
    summary["examples"] = [{"prompt": p, "completion": o.text, "answer": r.get("answer", "")}
                           for p, o, r in list(zip(prompts, outs, rows))[:3]]
    return summary


def evaluate_sampled(engine, tokenizer, cfg: RunConfig, rows: list[dict], scorer: Scorer, k: int, seed: int,
                     environment=None) -> dict:
    """avg@k, pass@k (k = 1, 2, 4, ... <= n) and maj@k from `k` samples a problem."""
    prompts = render_prompts(cfg.data, rows, tokenizer)
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    ro = cfg.rollout
    sampling = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens or ro.max_new_tokens, temperature=cfg.eval.temperature,
                              top_p=ro.top_p, top_k=ro.top_k, stop=tuple(ro.stop), seed=seed)
    outs = _generate(engine, tokenizer, cfg.rollout, prompt_ids, rows, k, sampling, environment)  # sample j of problem i: i * k + j
    texts = [o.text for o in outs]
    correct, _ = judge(scorer, correct_rewards(cfg.data, cfg.eval), texts, [rows[i // k] for i in range(len(outs))], [prompts[i // k] for i in range(len(outs))])
    counts = [sum(correct[i * k : (i + 1) * k]) for i in range(len(rows))]
    out = {f"avg@{k}": sum(counts) / (k * len(rows))}
    for kk in pass_ks(k):
        out[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in counts) / len(rows)
    answers = [final_answer(t) for t in texts]
    out[f"maj@{k}"] = sum(majority_correct(answers[i * k : (i + 1) * k], correct[i * k : (i + 1) * k])
                          for i in range(len(rows))) / len(rows)
    return out


def evaluate_sets(engine, tokenizer, cfg: RunConfig, sets: dict[str, list[dict]], scorer: Scorer,
                  k: int | None = None, seed: int = 0, environment=None) -> dict:
    """{"k": n, "datasets": {name: metrics}, "examples": {name: three greedy examples}}."""
    k = cfg.eval.k if k is None else k
    report: dict = {"k": k, "correct": correct_rewards(cfg.data, cfg.eval), "datasets": {}, "examples": {}}
    for name, rows in sets.items():
        greedy = evaluate_greedy(engine, tokenizer, cfg, rows, scorer, environment)
        metrics = {"greedy_accuracy": greedy["accuracy"], "num_prompts": greedy["num_prompts"]}
        metrics.update({key: greedy[key] for key in ("format", "answer_anywhere", "tool_calls") if key in greedy})
        if k > 1:
            metrics.update(evaluate_sampled(engine, tokenizer, cfg, rows, scorer, k, seed, environment))
        report["datasets"][name] = metrics
        report["examples"][name] = greedy["examples"]
    return report


def tracker_metrics(report: dict) -> dict[str, float]:
    """`eval/<data set>/<metric>` keys for the tracker."""
    return {f"eval/{name}/{key}": float(value) for name, metrics in report["datasets"].items()
            for key, value in metrics.items()}


def write_report(output_dir: str | Path, label: str, report: dict) -> Path:
    """Write `output_dir/eval/<label>.json` atomically (label: `step-N` or a checkpoint's name)."""
    folder = Path(output_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{label}.json"
    write_atomic(final, json.dumps(report, indent=2, ensure_ascii=False))
    return final


def evaluate_step(engine, tokenizer, cfg: RunConfig, sets: dict[str, list[dict]], scorer: Scorer, step: int,
                  output_dir: str | Path, tracker=None, environment=None) -> dict:
    """One in-training evaluation: every set, written to eval/step-N.json and logged under eval/."""
    report = {"step": step, **evaluate_sets(engine, tokenizer, cfg, sets, scorer, seed=cfg.trainer.seed * 7_919 + step,
                                            environment=environment)}
    write_report(output_dir, f"step-{step}", report)
    if tracker is not None:
        tracker.log(tracker_metrics(report), step)
    return report


def format_table(report: dict) -> str:
    """A plain-text table: one row per data set, one column per metric."""
    sets = report["datasets"]
    columns: list[str] = []
    for metrics in sets.values():
        columns += [c for c in metrics if c not in columns]
    header = ["data set"] + columns
    lines = [[name] + [_fmt(metrics.get(c)) for c in columns] for name, metrics in sets.items()]
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    render = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header)] + [render(r) for r in lines])


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
