"""The math-answer reward: extract the final answer, parse it safely, compare it with the gold.

Roles: the *gold* is ``example["answer"]`` (a bare answer, LaTeX, or a worked solution with a
``\\boxed{}``); the *prediction* is the completion. Both go through the same extraction and parser;
where a policy is asymmetric it says so. The package, in the order an answer travels:

- `rewards.math.extract`: which part of a text is the final answer (tags, boxes, "the answer is",
  a bare answer; in unmarked prose the last math segment or number);
- `rewards.math.normalize`, `rewards.math.parser` (its grammar in the docstring),
  `rewards.math.latex`, `rewards.math.build`: the bounded parser, text to `rewards.math.values`;
- `rewards.math.compare`, `rewards.math.numbers`: the comparison rules, one sentence each;
- `rewards.math.choice`: what the question tells (multiple-choice letters, "what percent");
- `rewards.math.fallback`: math-verify's parser for what ours cannot read, only under a deadline;
- `rewards.math.reward`: `answers_match` and the reward `math_answer`.

Normalisation: ``\\left``/``\\right``, spacing commands, ``\\dfrac``, ``\\text{}`` wrappers, trailing
unit words after a number ("125 miles", ``15\\mbox{ cm}^2``) and degree marks (``90^\\circ`` == 90)
are dropped, and so are words in any non-Latin script after a number (``5 米``); thousands
separators (``7,425,000``, ``1 000``, ``14{,}916``) are removed, a single decimal comma (``1,22``) is a decimal point; unicode minus signs, ``\\times``/``\\cdot`` and
full-width digits are mapped to ASCII.

Percent: a percent sign on one side only accepts either the same number or the number divided by
100 on the other (``28\\%`` matches ``28`` and ``0.28``); so does a question that asks for a percent.

Reading (strict by default; `math_answer` and the recipe's ``rewards.math_answer`` block choose):
only a marked final answer counts (``<answer>`` tags, ``\\boxed{}``/``\\box{}``, GSM8K's ``####``,
"the answer is", a bare answer, a closing computation or ``align`` block); a marked answer that
does not parse is unreadable, never a number picked out of it; boxed answers that disagree are
ambiguous; a completion whose answer cannot be read scores 0 with the reason ``unreadable``
(``reward/math_answer/unreadable``). The gold is trusted text: a worked solution is reduced to its
final answer (marker, else its last math segment or clean number).

Comparison: exact rational arithmetic first; a decimal matches only an exactly equal value
unless ``rounded_decimals`` (then to the precision written: ``3.14`` matches ``\\pi``, ``5.001``
does not match ``5``, ``0.7`` is not ``2/3``; ``float_rounding`` rounds both instead); irrational
constants at 50 digits, relative tolerance 1e-30 (``1/2004!`` is not ``1/2006!``); expressions by
expansion (never of a power above 64), then at sample points of both signs with no assumption on
the symbols and no numeric tolerance (``sqrt(x^2)`` is not ``x``), then ``simplify``. Different
variable names are different (``f(x)`` is not ``f(y)``). Tuples are ordered, sets are
not; intervals compare endpoints and closedness; ``a \\pm b`` is the set ``{a+b, a-b}``; matrices
compare element-wise. ``x = 2`` matches ``2`` when the left side is only symbols; two equations
match when one side-difference is a constant multiple of the other; two inequalities in one
variable when they have the same real solution set; a chain ``a = b = c`` and a computation
``2*7 + ... = 81`` are judged by their last part. Several different answers where the gold has
one (hedging: "3 or 4") score 0; an empty answer scores 0.
"""

from rewards.math.compare import equivalent
from rewards.math.extract import answer_candidates, extract_answer, math_segments
from rewards.math.reward import answers_match, match_verdict, math_answer, read_answer

__all__ = ["answer_candidates", "answers_match", "equivalent", "extract_answer", "math_answer", "math_segments",
           "match_verdict", "read_answer"]
