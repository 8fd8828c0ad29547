"""Our math-answer checker against math-verify on the labelled equivalence cases, in one run.

Run (CPU, from the repository root):
    python bench/rewards_vs_math_verify.py [--cases FILE ...] [--workers 2]
On a GPU cluster it is the same command (the checker is CPU-only).

Prints one JSON line: per source group, accuracy of ours and of math-verify (and of ours with the
math-verify fallback switched off, ``fallback=False``: our parser alone); items/s of ours (the
sandboxed worker pool, ``--workers`` processes, start-up excluded) and of math-verify (single
process, as it is normally called); and the known-failure cases.

Each case's harness conventions reach ours as options: its extraction targets decide what
unmarked prose may give (``unmarked``: the expression target reads a last number, LaTeX alone a last
math segment), and decimals match exact values to the precision written (``rounded_decimals``)
unless the case says otherwise (STACK compares exactly).

Honouring the case notes: ``expected`` is used as given, except that a note starting with
``DISPUTED`` or ``KNOWN FALSE POSITIVE`` means the mathematically right answer is the expected one:
for those the expected value is whether the two answers are mathematically equal (for the one
DISPUTED case, ``1 - 1/e`` vs ``1 + 1/e``, that is false; the KNOWN FALSE POSITIVE cases already
say false). Both checkers get the case's options: ``float_rounding``, ``strict``,
``allow_set_relation_comp`` (ours: ``relation_as_set``) and the extraction targets (ours:
``plain_numbers=False`` when the case extracts LaTeX only).

Cases: ``bench/data/math_equiv_cases.jsonl`` (349 cases, described in bench/data/math_equiv_cases.md),
``bench/data/public_equiv_cases.jsonl`` (56 cases mined later from other graders' test suites),
``bench/data/stack_algequiv_cases.jsonl`` (54, the STACK computer-algebra grader's AlgEquiv fixtures)
and, with ``--cases``, ``bench/data/areal_reward_cases.jsonl`` (39, AReaL's math-verify reward tests,
whose labels are math-verify's own verdicts, so not in the default set); each case names its
source, see bench/data/README.md.

Groups: ``math_verify_tests`` (Math-Verify's tests and example file), ``lighteval``,
``nemo_mindspeed`` (NeMo-Skills and MindSpeed-RL graders' tests), ``open_r1``, ``known_failures``
(the two tests commented out upstream and the ten issue reports), and the later public cases as
their own groups: ``hendrycks_math`` (MATH's ``is_equiv`` tests), ``qwen25_math`` (Qwen2.5-Math's
grader tests and its listed pairs), ``lighteval_letters`` (multiple-choice letters),
``stack_algequiv`` (plain computer-algebra syntax: powers, roots, logarithms, equations,
inequalities, sets) and ``areal_rewards`` (completions scored by an RL framework's reward tests). Math-verify has
no letter extraction, so on ``lighteval_letters`` it runs with its LaTeX and expression targets.

Conventions: where two sources in the set label the same form oppositely (a reordered bare list;
``28\\%`` against ``28``), no checker can meet both, so the case whose label contradicts the
others carries ``upstream_expected`` (the source's label), ``expected`` (the set's one label for
that form) and a ``convention:`` note naming the cases it contradicts. The report lists them as
``relabelled_by_convention``, with both labels and both checkers' verdicts.

False positives: cases that expect false and that a checker calls true; those whose note starts
with ``policy:`` (a convention the upstream harness pins, such as string comparison of lists) or
says "policy question" are counted apart, as ``policy_false_positives``.

Departures: none from a paper; the harness for math-verify is a generic parse -> verify, so a few
upstream harness quirks (lighteval's multilingual anchors) are not reproduced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_CASES = [DATA / "math_equiv_cases.jsonl", DATA / "public_equiv_cases.jsonl", DATA / "stack_algequiv_cases.jsonl"]
# not by default: AReaL's reward tests assert what math-verify returns (their harness is math-verify),
# so they measure agreement with math-verify rather than correctness; pass it with --cases to include it
EXTRA_CASES = [DATA / "areal_reward_cases.jsonl"]
NEW_GROUPS = {"hendrycks/math": "hendrycks_math", "QwenLM/Qwen2.5-Math": "qwen25_math",
              "maths/moodle-qtype_stack": "stack_algequiv", "leandermaben/AReaL": "areal_rewards"}


def group_of(case: dict) -> str:
    src = case["source"]
    if case["options"].get("extraction") == ["letters"]:
        return "lighteval_letters"
    for prefix, group in NEW_GROUPS.items():
        if src.startswith(prefix):
            return group
    if "issue" in src or "commented out" in case["test"]:
        return "known_failures"
    if src.startswith("huggingface/Math-Verify"):
        return "math_verify_tests"
    if src.startswith("huggingface/lighteval"):
        return "lighteval"
    if src.startswith("huggingface/open-r1"):
        return "open_r1"
    return "nemo_mindspeed"


def expected_of(case: dict) -> bool:
    note = case.get("note", "")
    if note.startswith("DISPUTED"):
        return not case["expected"]  # the upstream assertion is the mathematically wrong one
    return bool(case["expected"])


def case_options(case: dict) -> dict:
    """The case's harness options, as `math_answer` keyword arguments (the same facts math-verify gets)."""
    o = case["options"]
    out = {k: o[k] for k in ("float_rounding", "strict") if k in o}
    if "allow_set_relation_comp" in o:
        out["relation_as_set"] = o["allow_set_relation_comp"]
    extraction = o.get("extraction", ["latex", "expr"])
    # the harness's extraction targets read unmarked prose: LaTeX alone its last math segment,
    # with the expression target its last number too (our strict default reads neither)
    out["unmarked"] = "last_value" if "expr" in extraction else "last_math" if "latex" in extraction else "reject"
    # rounded decimals: as the case's harness says, else a tolerance (math-verify rounds to 6 places)
    out["rounded_decimals"] = o.get("rounded_decimals", True)
    return out


def is_policy_case(case: dict) -> bool:
    note = case.get("note", "")
    return note.startswith("policy:") or "policy question" in note


def math_verify_verdict(c: dict) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    o = c["options"]
    configs = []
    extraction = o.get("extraction", ["latex", "expr"])
    for e in ["latex", "expr"] if extraction == ["letters"] else extraction:
        if e == "latex":
            configs.append(LatexExtractionConfig(boxed_match_priority=o.get("boxed_match_priority", 55)))
        else:
            configs.append(ExprExtractionConfig())
    try:
        g = parse(c["gold"], extraction_config=configs)
        p = parse(c["pred"], extraction_config=configs)
        return bool(verify(
            g, p,
            float_rounding=o.get("float_rounding", 6),
            strict=o.get("strict", True),
            allow_set_relation_comp=o.get("allow_set_relation_comp", False),
        ))
    except Exception:  # noqa: BLE001 - a crash is a wrong verdict, not a stop
        return False


def run_both(cases, workers: int, chunks: int = 4):
    """Verdicts of both checkers; timings interleaved chunk by chunk so that load from other
    processes on the machine falls on both alike."""
    from rewards import RewardSpec, Scorer

    ours, mv = [], []
    ours_s = mv_s = 0.0
    spec = RewardSpec("math_answer")
    with Scorer([spec], workers=workers, timeout_s=5.0) as scorer:
        warm = cases[:8]  # warm-up: first-use costs in the workers and in this process
        scorer.score([c["pred"] for c in warm], [{"answer": c["gold"]} for c in warm])
        for c in warm:
            math_verify_verdict(c)
        size = -(-len(cases) // chunks)
        metrics = {"reward/math_answer/timeouts": 0.0, "reward/math_answer/errors": 0.0}
        for k in range(0, len(cases), size):
            part = cases[k : k + size]
            t0 = time.perf_counter()
            res = scorer.score([c["pred"] for c in part], [{"answer": c["gold"]} for c in part],
                               [{"sample_id": str(k + i), **case_options(c)} for i, c in enumerate(part)])
            ours_s += time.perf_counter() - t0
            ours += [v == 1.0 for v in res.per_function["math_answer"]]
            for key in metrics:
                metrics[key] += res.metrics[key]
            t0 = time.perf_counter()
            mv += [math_verify_verdict(c) for c in part]
            mv_s += time.perf_counter() - t0
    return ours, ours_s, metrics, mv, mv_s


def run_ours_alone(cases, workers: int):
    """Our parser without the math-verify fallback (accuracy only)."""
    from rewards import RewardSpec, Scorer

    with Scorer([RewardSpec("math_answer", 1.0, {"fallback": False})], workers=workers, timeout_s=5.0) as scorer:
        res = scorer.score([c["pred"] for c in cases], [{"answer": c["gold"]} for c in cases],
                           [{"sample_id": str(i), **case_options(c)} for i, c in enumerate(cases)])
    return [v == 1.0 for v in res.per_function["math_answer"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=[str(p) for p in DEFAULT_CASES])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--show-disagreements", action="store_true", help="print cases where ours is wrong (stderr)")
    args = ap.parse_args(argv)

    cases = [json.loads(line) for path in args.cases for line in Path(path).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    expected = [expected_of(c) for c in cases]
    ours, ours_s, metrics, mv, mv_s = run_both(cases, args.workers)
    alone = run_ours_alone(cases, args.workers)

    groups = defaultdict(lambda: {"n": 0, "ours": 0, "math_verify": 0, "alone": 0})
    for c, e, o, m, a in zip(cases, expected, ours, mv, alone):
        g = groups[group_of(c)]
        g["n"] += 1
        g["ours"] += o == e
        g["math_verify"] += m == e
        g["alone"] += a == e
    report = {
        "bench": "rewards_vs_math_verify",
        "n": len(cases),
        "groups": {
            k: {"n": v["n"], "ours": round(v["ours"] / v["n"], 4), "math_verify": round(v["math_verify"] / v["n"], 4),
                "ours_correct": v["ours"], "math_verify_correct": v["math_verify"],
                "ours_without_math_verify": round(v["alone"] / v["n"], 4)}
            for k, v in sorted(groups.items())
        },
        "overall": {"ours": round(sum(o == e for o, e in zip(ours, expected)) / len(cases), 4),
                    "math_verify": round(sum(m == e for m, e in zip(mv, expected)) / len(cases), 4)},
        "ours_items_per_s": round(len(cases) / ours_s, 1),
        "ours_workers": args.workers,
        "math_verify_items_per_s": round(len(cases) / mv_s, 1),
        "speed_ratio": round(mv_s / ours_s, 2),
        "ours_timeouts": metrics["reward/math_answer/timeouts"],
        "ours_errors": metrics["reward/math_answer/errors"],
    }
    big = {k: v for k, v in groups.items() if v["n"] >= 10}
    report["ours_above_math_verify_on_every_group_of_10"] = all(v["ours"] > v["math_verify"] for v in big.values())
    report["groups_of_10_where_ours_is_not_above"] = sorted(k for k, v in big.items() if v["ours"] <= v["math_verify"])
    for who, verdicts in (("ours", ours), ("math_verify", mv)):
        fp = [i for i, (c, e, v) in enumerate(zip(cases, expected, verdicts)) if v and not e]
        report[f"{who}_false_positives"] = sum(not is_policy_case(cases[i]) for i in fp)
        report[f"{who}_policy_false_positives"] = sum(is_policy_case(cases[i]) for i in fp)
    report["ours_policy_false_positive_cases"] = [
        {"gold": c["gold"], "pred": c["pred"], "source": c["source"]}
        for c, e, v in zip(cases, expected, ours) if v and not e and is_policy_case(c)
    ]
    report["relabelled_by_convention"] = [
        {"gold": c["gold"], "pred": c["pred"], "source": c["source"], "upstream_expected": c["upstream_expected"],
         "expected": c["expected"], "ours": bool(o), "math_verify": bool(m)}
        for c, o, m in zip(cases, ours, mv) if "upstream_expected" in c and c["upstream_expected"] != c["expected"]
    ]
    if args.show_disagreements:
        for i, (c, e, o, m) in enumerate(zip(cases, expected, ours, mv)):
            if o != e:
                print(f"[{i}] {group_of(c)} expected={e} ours={o} mv={m} gold={c['gold'][:80]!r} pred={c['pred'][-100:]!r}",
                      file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
