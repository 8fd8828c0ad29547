"""Prompts: how a row is rendered into the text the policy continues, and the order rows are drawn in.

The prompt template turns a row (`grpo.data.sources`) into the text the policy continues; `chat`
renders the problem as the user turn of the tokenizer's own chat template (which may prefill
`<think>`: see `prompt_prefills_think`). `PromptSampler` draws rows without replacement, epoch
after epoch, from a state of two numbers, so a resumed run draws the same prompts.

    prompts = render_prompts(cfg.data, train_rows[:8], tokenizer)
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from grpo.config import DataConfig, EvalConfig

# --- templates ----------------------------------------------------------------------------------

# `r1_zero` is the template of DeepSeek-R1-Zero (DeepSeek-R1 paper, arXiv 2501.12948, table 1),
# with the problem in place of "prompt". `qwen_math_boxed` is the Qwen2.5-Math chat prompt asking
# for a \boxed{} answer, the template Dr. GRPO (arXiv 2503.20783) found best for Qwen2.5-Math
# bases. `countdown` asks for an equation from {numbers} and {target} and opens the thinking block
# for the model (as TinyZero's base prompt does). `r1_zero_examples` is `r1_zero` followed by two worked
# exchanges in the tags: small instruct models (SmolLM2-135M) never write the tags from the bare template
# or a chat instruction, but copy them from examples. The `*_tiny`/`short` templates keep the R1 shape
# in the characters the built-in tiny base's tokenizer knows.
TEMPLATES = {
    "r1_zero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {question}. Assistant:"
    ),
    "qwen_math_boxed": (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "countdown": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer.\nUser: With the numbers {numbers}, write an equation equal to {target}. Only + - * / and "
        "parentheses are allowed, and every number must be used exactly once. Reason inside <think> </think> and "
        "give only the equation inside <answer> </answer>, e.g. <answer> (7 - 3) * 2 </answer>.\n"
        "Assistant: I will work it out step by step.\n<think>"
    ),
    "r1_zero_examples": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
        "User: What is 6 + 3?\nAssistant: <think> 6 + 3 = 9 </think> <answer> 9 </answer>\n"
        "User: What is 8 - 5?\nAssistant: <think> 8 - 5 = 3 </think> <answer> 3 </answer>\n"
        "User: {question}\nAssistant:"
    ),
    "r1_zero_tiny": (
        "User: {question}=? Show work in <think></think> then answer in <answer></answer>.\n"
        "Assistant:"
    ),
    # `sums_tiny` opens the thinking block with the sum, as `countdown` opens it with "<think>":
    # the model may close it at once with the value or work the sum out step by step first.
    # `sums_tiny_nothink` forbids thinking (an empty block): the ablation that shows its worth.
    "sums_tiny": (
        "User: Show work in <think></think> then answer in <answer></answer>. {question}=?\n"
        "Assistant: <think>{question}="
    ),
    "sums_tiny_nothink": (
        "User: Show work in <think></think> then answer in <answer></answer>. {question}=?\n"
        "Assistant: <think></think>"
    ),
    # `torl`: a base-model prompt in the ToRL setup (arXiv 2503.23383): code in ```python blocks, run by
    # the python tool (rollout.tools: code_open "```python", code_close "```\n"), output in ```output blocks
    "torl": (
        "A conversation between User and Assistant. The user asks a math question, and the Assistant solves it. "
        "The Assistant may write Python code in a ```python ... ``` block: the code is run and its output "
        "comes back in a ```output ... ``` block, and the Assistant goes on. The final answer is put within "
        "\\boxed{{}}.\nUser: {question}\nAssistant:"
    ),
    # `tool_tiny`: the python tool recipe (recipes/tiny-tool-cpu.yaml); the instruction names the tool's markers
    "tool_tiny": (
        "User: {question}=? You may run Python in <code></code>. Answer in <answer></answer>.\n"
        "Assistant:"
    ),
    "r1_zero_short": (
        "User: {question} Show work in <think></think> then answer in <answer></answer>.\n"
        "Assistant:"
    ),
}
CHAT = "chat"


def template_fields(template: str) -> set[str]:
    """Row keys a template reads (`chat` reads `question`)."""
    if template == CHAT:
        return {"question"}
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES) + [CHAT]}")
    return {name for _, name, _, _ in string.Formatter().parse(TEMPLATES[template]) if name}


def render_prompt(template: str, row: dict, tokenizer=None, chat_instruction: str = "") -> str:
    """The text the policy continues for one row."""
    if template == CHAT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template `chat` needs a tokenizer with a chat template")
        content = f"{row['question']}\n{chat_instruction}".rstrip() if chat_instruction else row["question"]
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    template_fields(template)  # raises on an unknown name
    values = {k: (", ".join(map(str, v)) if k == "numbers" and isinstance(v, list) else v) for k, v in row.items()}
    return TEMPLATES[template].format(**values)


def render_prompts(cfg: DataConfig, rows: list[dict], tokenizer=None) -> list[str]:
    return [render_prompt(cfg.template, row, tokenizer, cfg.chat_instruction) for row in rows]


def longest_prompt_tokens(cfg: DataConfig, rows: list[dict], tokenizer, batch: int = 512) -> int:
    """Tokens of the longest rendered prompt among `rows`, encoded as the sampler encodes prompts
    (no special tokens added); 0 for no rows. What a rollout engine's context must hold besides the
    completion.

    Prompts are encoded longest (in UTF-8 bytes) first, and encoding stops once no prompt left can
    be longer in tokens than the longest found: a token spans at least one byte (byte-level BPE,
    a character vocabulary, SentencePiece's byte fallback), plus one word-start marker that
    SentencePiece may add, so a text of b bytes has at most b + 1 tokens.
    """
    texts = sorted(render_prompts(cfg, rows, tokenizer), key=_utf8_length, reverse=True)
    longest = 0
    for start in range(0, len(texts), batch):
        if _utf8_length(texts[start]) + 1 <= longest:  # sorted: no later text can be longer
            break
        ids = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        longest = max(longest, *map(len, ids))
    return longest


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8"))


def template_text(data: DataConfig) -> str:
    """What the prompt template asks of the model, as text (`chat`: its instruction)."""
    if data.template == CHAT:
        return data.chat_instruction
    template_fields(data.template)  # raises on an unknown name
    return TEMPLATES[data.template]


def correct_rewards(data: DataConfig, evaluation: EvalConfig) -> list[str]:
    """The rewards that must all score 1.0 for a completion to count as correct: `eval.correct` when
    the recipe names them, else derived from the source and the template. The answer reward is the
    source's checker (`countdown`, `reasoning_gym` for a `reasoning_gym:<task>` source, else
    `math_answer`); `format` joins it when the template asks for the R1 `<answer>` tags. A template
    that asks for `\\boxed{}` (and no tags) is judged on the answer alone.

    >>> correct_rewards(DataConfig(template="r1_zero"), EvalConfig())
    ['math_answer', 'format']
    >>> correct_rewards(DataConfig(template="qwen_math_boxed"), EvalConfig())
    ['math_answer']
    >>> correct_rewards(DataConfig(source="reasoning_gym:gsm_symbolic", template="r1_zero"), EvalConfig())
    ['reasoning_gym', 'format']
    >>> correct_rewards(DataConfig(template="qwen_math_boxed"), EvalConfig(correct=["math_answer", "format"]))
    ['math_answer', 'format']
    """
    if evaluation.correct is not None:
        return list(evaluation.correct)
    if data.source.startswith("reasoning_gym:"):
        answer = "reasoning_gym"
    elif data.source == "countdown":
        answer = "countdown"
    else:
        answer = "math_answer"
    return [answer, "format"] if "<answer>" in template_text(data) else [answer]


def prompt_prefills_think(prompt: str) -> bool:
    """True when the prompt already opens the thinking block (some chat templates and `countdown`):
    the completion then starts inside `<think>` and must not open it again."""
    return prompt.rstrip().endswith("<think>")


# --- drawing ------------------------------------------------------------------------------------


@dataclass
class PromptSampler:
    """Draws rows without replacement, reshuffling (seeded) at every epoch.

    `position` and `epoch` are all the state there is, so a resumed run draws the same prompts.
    """

    rows: list[dict]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("no training prompts")
        self._order = self._shuffled(self.epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[dict]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.rows[self._order[self.position]])
            self.position += 1
        return batch
