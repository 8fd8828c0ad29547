"""The embedded tiny base model: a character-level tokenizer, a tiny Qwen3-MoE, and its pretraining.

R1-Zero is reinforcement learning on a *pretrained base*. The honest miniature that fits a laptop
CPU is a tiny Mixture-of-Experts model that this module pretrains on synthetic text: mostly plain
arithmetic (blocks of equations, question/answer exchanges), where a minority of the exchanges
(`tagged_share`, 15% of exchanges, about 4.5% of documents) answer in the R1 format. That is the
small prior real base models have for the format (R1-Zero's bases had seen such text): greedy
decoding never picks it, so the base answers plainly and scores ~0 in-format, but sampling finds it
now and then, and RL has to make it the rule. With a rarer prior (5% of exchanges and below) the
tiny model never learned to do its sums inside the tags, and RL had nothing correct to reinforce.

The shape fits vLLM's CPU build as well as transformers: head_dim 32 (its CPU attention takes 32,
64, 80, 96, 112, 128 and up; 96 / 4 heads = 24 did not run) and every width a multiple of 32
(hidden 96, experts 96, attention 4 x 32 and 2 x 32), which its MoE kernels would otherwise pad.

The result is cached under `$GRPO_ZERO_CACHE` (default `~/.cache/grpo-zero`) keyed by a hash of
everything that determines it, so it is built once per machine. Building it is deterministic for a
given torch version (it always runs on `spec.threads` threads, see `pretrain_tiny_base`). Most of a
cold tiny-cpu run is this pretraining (tiny-arith-moe): 1600 steps of 8 x 128 tokens, 50-85 ms each on two threads
here. Measured on this 2-core machine, each with the tiny-cpu RL recipe after it (held-out greedy
accuracy after RL; the bar is 0.90): 8 rows x 1600 steps 0.995 (0.985 after 20 RL steps);
8 x 1800 1.00; 16 x 1800 0.99 (about twice the time); 16 x 1100 0.78; 8 x 1400 0.50; 6 x 1800
0.79; 4 x 1800 (one thread) 0.06. Fewer steps or fewer rows per step leave the base's sums too
weak for RL to build on. Two processes of one thread each, splitting a step's rows, were no
faster than one process on two threads (68 ms a step).

A second base, `tiny-sums-moe` (same shape), is pretrained on the `sums` corpus (`sums_document`):
sums of a two-digit number and three one-digit ones, where a chain of one-digit additions is
easy and the whole sum at once is hard, and where answers almost never work the sum out; RL then
has to make the worked chain the habit (recipes/tiny-reasoning-cpu.yaml). Its built-in values
sit in a narrow band, measured here with the reasoning recipe after each build:
- chain answers at 15% of the tagged ones, one thread: greedy accuracy 0.11 before RL, 0.85 after;
- the same corpus on two threads: 0.63 before (its direct answers were already right too often);
- chain answers at 5% or 10%: RL did not find the chain (0.10 -> 0.11 and 0.10 -> 0.12);
- no whole sums in the equation blocks: the base wrote chains but copied a wrong value into
  `<answer>` (pass@8 0.33).
It is built on one thread (`threads=1`; 216 s here), since a build on two threads is another model.

Usage::

    path = ensure_tiny_base("tiny-arith-moe")     # builds on first call (about 2 minutes on 2 cores)
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo.data.tasks import ArithmeticTask, SumsTask
from grpo.model.cache import build_once, cache_root

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TOOL_TAGS = ("<code>", "</code>", "<output>", "</output>")  # the python tool's markers (tiny-tool-moe only)
SPECIALS = ("<pad>", "<eos>", "<unk>")
# Characters of the vocabulary: enough for arithmetic, short English instructions and the tags.
CHARS = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " .,:;?!+-*/=()'\n"
)


def build_char_tokenizer(model_max_length: int = 512, tool_tags: bool = False):
    """A character-level fast tokenizer, built locally (no download).

    Every character of `CHARS` is one token; the four R1 tags are single added tokens (as in
    tokenizers of reasoning models), and with `tool_tags` the python tool's four markers too;
    `<eos>` ends a document and `<pad>` pads batches.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    tokenizer.add_tokens(list(TAGS) + (list(TOOL_TAGS) if tool_tags else []))
    return tokenizer


@dataclass(frozen=True)
class TinyBaseSpec:
    """Everything that determines a built-in base model (its cache key is a hash of this)."""

    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # explicit (Qwen3 allows heads * head_dim != hidden); vLLM's CPU attention needs >= 32
    num_experts: int = 8
    top_k: int = 2
    expert_width: int = 96
    max_positions: int = 256
    pretrain_steps: int = 1600
    batch_size: int = 8  # rows per step (6 rows, or 1400 steps, no longer carried RL to 0.9: see above)
    row_tokens: int = 128  # whole documents are packed into rows of this many tokens
    lr: float = 3e-3
    tagged_share: float = 0.15  # share of question/answer exchanges written in the R1 format
    max_first: int = 99  # the arithmetic the base is taught: a in [0, max_first] ...
    max_second: int = 9  # ... plus b in [0, max_second]
    seed: int = 0
    threads: int = 2  # torch threads of the build: fixed, because the float sums depend on it
    experts_implementation: str = "grouped_mm"  # torch 2.13's CPU grouped GEMM: 1.2x the per-expert loop here
    version: int = 7  # bump when the corpus or the training code changes meaning
    # corpus "sums" (`sums_document`): sums of `terms` numbers, a two-digit one first, where a
    # chain of one-digit additions is easy and the whole sum at once is hard
    corpus: str = "arithmetic"
    terms: int = 4
    chain_share: float = 0.0  # share of equation lines written as a worked chain
    whole_share: float = 0.0  # share of equation lines giving a whole sum at once
    chain_answer_share: float = 0.0  # share of tagged answers whose thinking is the worked chain
    tagged_restate_share: float = 1.0  # share of the other tagged answers that think "a+b+c=s" (else "s")
    plain_chain_share: float = 0.0  # share of plain answers that are the worked chain
    restate_share: float = 0.0  # share of the other plain answers that restate the sum before its value (tool:
    # of the answers that do not call the tool, tagged or not)
    # corpus "tool" (`tool_document`): multiplications, with the python tool's markers in the vocabulary
    tool_share: float = 0.0  # share of answers that call the tool (<code>print(q)</code><output>v</output>)
    code_share: float = 0.0  # share of documents that are a code snippet and its output (no question)
    block_share: float = 0.5  # share of documents that are blocks of multiplications


# fields added after bases were cached: left out of the cache key while at their defaults
_LATER_FIELDS = {"tool_share": 0.0, "code_share": 0.0, "block_share": 0.5}

BUILTIN_BASES = {
    "tiny-arith-moe": TinyBaseSpec(),
    # 2400 steps: at 1600 the steps of a worked chain were right too seldom for RL to build on
    "tiny-sums-moe": TinyBaseSpec(corpus="sums", pretrain_steps=2400, tagged_share=0.5, chain_share=0.5,
                                  whole_share=0.1, chain_answer_share=0.15, restate_share=0.5, threads=1,
                                  version=1),
    # multiplications of a number up to 999 by one up to 99: hard to do at once for a tiny model,
    # one line of Python with the tool; 1 answer in 5 calls it (recipes/tiny-tool-cpu.yaml), the others
    # restate the question first, so that the base learns to copy it (see `tool_document`). One thread:
    # two, beside other work on this 2-core machine, took 0.67 s a step instead of 0.08 s
    "tiny-tool-moe": TinyBaseSpec(corpus="tool", max_first=999, max_second=99, tagged_share=0.5, restate_share=1.0,
                                  tool_share=0.2, block_share=0.2, pretrain_steps=4000, threads=1, version=2),
}


def tiny_moe_config(spec: TinyBaseSpec, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.expert_width * 2,
        moe_intermediate_size=spec.expert_width,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=True,
        max_position_embeddings=spec.max_positions,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )


# --- the synthetic pretraining corpus ---------------------------------------------------------

_QUESTIONS = ("{q}=?", "What is {q}?", "{q}")
# Base models have seen instructions they do not follow: the R1 instruction appears in the corpus
# but the answer that follows it is tagged no more often than after any other question.
_INSTRUCTIONS = ("", "", " Be brief.", " Show work in <think></think> then answer in <answer></answer>.")


def pretraining_document(rng: random.Random, task: ArithmeticTask, tagged_share: float) -> str:
    """One synthetic document: a block of equations (most documents, so that most tokens teach
    arithmetic rather than boilerplate) or one question/answer exchange, which is written in the
    R1 format with probability `tagged_share`."""
    if rng.random() < 0.7:  # equations, one per line
        lines = []
        for _ in range(rng.randint(4, 8)):
            q, a = task.sample_problem(rng)
            lines.append(f"{q}={a}")
        return "\n".join(lines)
    q, a = task.sample_problem(rng)
    question = rng.choice(_QUESTIONS).format(q=q) + rng.choice(_INSTRUCTIONS)
    if rng.random() < tagged_share:  # the tiny model's "reasoning" is the sum itself
        return f"User: {question}\nAssistant: <think>{a}</think><answer>{a}</answer>"
    return f"User: {question}\nAssistant: {a}"


_SUMS_INSTRUCTIONS = ("", "", "Be brief. ", "Show work in <think></think> then answer in <answer></answer>. ")


def sums_document(rng: random.Random, task: SumsTask, spec: TinyBaseSpec) -> str:
    """One document of the `sums` corpus (`tiny-sums-moe`).

    Most documents (60%) are blocks of equations, as in a textbook: one-digit additions to a
    number of up to three digits (the single step, ``x+d=y``), a share `whole_share` of whole sums
    given at once and a share `chain_share` of sums worked as chains (`SumsTask.chain`). The rest
    are question/answer exchanges, the instruction before the sum. A share `tagged_share` of them
    answer in the R1 format, and of those only `chain_answer_share` think in steps: the others
    close the thinking block with the value at once (``<think>47+8+6+9=70</think>``). Plain answers
    give the value, restating the sum first for a share `restate_share`. So worked answers are rare
    (7.5% of exchanges at the built-in values): the base answers at once, mostly wrongly, until RL
    makes the worked chain its habit.
    """
    if rng.random() < 0.6:
        lines = []
        for _ in range(rng.randint(4, 8)):
            r = rng.random()
            if r < spec.chain_share:
                lines.append(task.chain(task.sample_terms(rng)))
            elif r < spec.chain_share + spec.whole_share:
                q, a = task.sample_problem(rng)
                lines.append(f"{q}={a}")
            else:
                x = rng.randint(task.min_first, task.max_first + (task.terms - 2) * task.max_term)
                d = rng.randint(1, task.max_term)
                lines.append(f"{x}+{d}={x + d}")
        return "\n".join(lines)
    terms = task.sample_terms(rng)
    q, a = "+".join(map(str, terms)), str(sum(terms))
    question = rng.choice(_SUMS_INSTRUCTIONS) + rng.choice(_QUESTIONS).format(q=q)
    if rng.random() < spec.tagged_share:
        if rng.random() < spec.chain_answer_share:
            think = task.chain(terms)
        else:
            think = f"{q}={a}" if rng.random() < spec.tagged_restate_share else a
        return f"User: {question}\nAssistant: <think>{think}</think><answer>{a}</answer>"
    if rng.random() < spec.plain_chain_share:
        return f"User: {question}\nAssistant: {task.chain(terms)}"
    at_once = f"{q}={a}" if rng.random() < spec.restate_share else a
    return f"User: {question}\nAssistant: {at_once}"


_TOOL_INSTRUCTIONS = ("", "", " Answer in <answer></answer>.",
                      " You may run Python in <code></code>. Answer in <answer></answer>.")


def tool_document(rng: random.Random, task: ArithmeticTask, spec: TinyBaseSpec) -> str:
    """One document of the `tool` corpus (`tiny-tool-moe`).

    Blocks of multiplications (`block_share` of the documents: the notation, not a skill a tiny
    model can learn), code snippets with their output (`code_share`: what the tool looks like), and
    question/answer exchanges. A share `tool_share` of the answers calls the tool
    (``<code>print(347*29)</code><output>10063\n</output><answer>10063</answer>``); the others
    give the value at once, restating the question first for a share `restate_share`
    (``347*29=10063``), then in the answer tags for a share `tagged_share`
    (``347*29=10063<answer>10063</answer>``). So the base answers at once, mostly wrongly, and RL
    has to make the tool its habit.

    A tool call is only right when its code carries the question's operands, and the answer the
    tool's output: copying, which the restated answers practise too. Measured here (greedy copies,
    teacher-forced, of 64 questions into ``print(`` and of the tool's output into ``<answer>``):
    after the other bases' 1600 steps the base never copied, with 1 call in 10 and no restating
    (RL then had nothing right to reinforce) as with 1 call in 5 and restated plain answers; at
    the built-in values copying appeared suddenly between steps 1200 and 1600 of 4000 (64 of 64 from
    there on), while a 2400-step schedule got there only in its last steps (question 0.91, output
    0.06). Sampled, the built base calls the tool in 14% of answers and copies the operands in 97%
    of its calls; greedy, it restates and answers at once (1% right).
    """
    r = rng.random()
    if r < spec.code_share:
        q, a = task.sample_problem(rng)
        return f"<code>print({q})</code><output>{a}\n</output>"
    if r < spec.code_share + spec.block_share:
        return "\n".join("=".join(task.sample_problem(rng)) for _ in range(rng.randint(4, 8)))
    q, a = task.sample_problem(rng)
    question = rng.choice(_QUESTIONS).format(q=q) + rng.choice(_TOOL_INSTRUCTIONS)
    if rng.random() < spec.tool_share:
        return f"User: {question}\nAssistant: <code>print({q})</code><output>{a}\n</output><answer>{a}</answer>"
    restated = f"{q}={a}" if rng.random() < spec.restate_share else ""
    if rng.random() < spec.tagged_share:
        return f"User: {question}\nAssistant: {restated}<answer>{a}</answer>"
    return f"User: {question}\nAssistant: {restated or a}"


def corpus_task(spec: TinyBaseSpec) -> ArithmeticTask | SumsTask:
    if spec.corpus == "tool":
        return ArithmeticTask(max_first=spec.max_first, max_second=spec.max_second, ops=("*",))
    if spec.corpus == "sums":
        return SumsTask(terms=spec.terms, min_first=10, max_first=spec.max_first, max_term=spec.max_second)
    if spec.corpus == "arithmetic":
        return ArithmeticTask(max_first=spec.max_first, max_second=spec.max_second)
    raise ValueError(f"unknown tiny-base corpus {spec.corpus!r}; known: arithmetic, sums, tool")


class DocumentPacker:
    """Packs whole synthetic documents, each ended by `<eos>`, into rows of `row_tokens` tokens.

    Each row opens with the oldest waiting document and is then filled first-fit from a pool of
    the next `pool` documents, so the rows carry text rather than padding (93% filled here,
    82% when a document that did not fit simply opened the next row) and no document waits
    longer than a few rows.
    Each document sits at its own positions (they restart at 0 after every `<eos>`), which makes
    transformers' attention block-diagonal: a token sees only its own document, as a prompt at
    inference sees nothing before it. Seen here (not a controlled comparison): kept apart, plain
    accuracy on the R1 prompt was 11% at step 600 and 68% at step 900 of a 900-step run; attending
    across documents, 1% after 600-step runs at learning rates 5e-3 and 1e-2.
    """

    def __init__(self, rng: random.Random, task: ArithmeticTask, tokenizer, spec: TinyBaseSpec, pool: int = 64):
        self.rng, self.task, self.tokenizer, self.spec, self.pool = rng, task, tokenizer, spec, pool
        self.waiting: list[list[int]] = []  # encoded documents in the order they were drawn
        self._ready: list[list[int]] = []  # drawn and encoded, not yet waiting; next one last

    def _document(self) -> list[int]:
        if not self._ready:  # documents are drawn in order and encoded 256 at a time (one fast call)
            if isinstance(self.task, SumsTask):
                texts = [sums_document(self.rng, self.task, self.spec) for _ in range(256)]
            elif self.spec.corpus == "tool":
                texts = [tool_document(self.rng, self.task, self.spec) for _ in range(256)]
            else:
                texts = [pretraining_document(self.rng, self.task, self.spec.tagged_share) for _ in range(256)]
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            eos, cap = self.tokenizer.eos_token_id, self.spec.row_tokens - 1
            self._ready = [ids[:cap] + [eos] for ids in reversed(encoded)]
        return self._ready.pop()

    def _row(self) -> list[list[int]]:
        while len(self.waiting) < self.pool:
            self.waiting.append(self._document())
        row, used, kept = [self.waiting[0]], len(self.waiting[0]), []
        for doc in self.waiting[1:]:
            if used + len(doc) <= self.spec.row_tokens:
                row.append(doc)
                used += len(doc)
            else:
                kept.append(doc)
        self.waiting = kept
        return row

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids, labels), each [batch_size, row_tokens]."""
        width, pad = self.spec.row_tokens, self.tokenizer.pad_token_id
        input_ids = torch.full((self.spec.batch_size, width), pad)  # [B, L]
        position_ids = torch.zeros((self.spec.batch_size, width), dtype=torch.long)  # [B, L]
        labels = torch.full((self.spec.batch_size, width), -100)  # [B, L]
        for b in range(self.spec.batch_size):
            docs = self._row()
            row = [t for doc in docs for t in doc]
            positions = [i for doc in docs for i in range(len(doc))]
            input_ids[b, : len(row)] = torch.tensor(row)
            labels[b, : len(row)] = input_ids[b, : len(row)]
            # the padding tail is one more segment (positions from 0), never a target
            position_ids[b] = torch.tensor(positions + list(range(width - len(row))))
        return input_ids, position_ids, labels


def pretrain_tiny_base(spec: TinyBaseSpec, out_dir: Path, progress: bool = True) -> Path:
    """Pretrain the tiny base on the synthetic corpus and save it (model + tokenizer) to out_dir."""
    # The sums a float32 run adds up in parallel depend on the thread count, and a tiny model's
    # pretraining is sensitive to them (seen here: 99% vs 86% tagged accuracy between 1 and 2
    # threads), so the base is always built on `spec.threads` threads, whatever the machine: the same
    # model wherever the CPU kernels agree. Two threads take 0.7x the time of one on an idle 2-core
    # machine, but stall where other work keeps both cores busy (seen here: 1100 steps took 1073 s
    # beside another training job instead of about 90 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _pretrain(spec, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(spec: TinyBaseSpec, out_dir: Path, progress: bool) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    task = corpus_task(spec)
    tokenizer = build_char_tokenizer(tool_tags=spec.corpus == "tool")
    config = tiny_moe_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, experts_implementation=spec.experts_implementation
    )
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.pretrain_steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item()))

    from tqdm.auto import tqdm

    packer = DocumentPacker(rng, task, tokenizer, spec)
    bar = tqdm(range(spec.pretrain_steps), desc="pretraining tiny base", disable=not progress)
    for step in bar:
        input_ids, position_ids, labels = packer.batch()
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        # No attention mask and no cache: transformers then reads document boundaries off the
        # restarting position ids and masks attention block-diagonally (see DocumentPacker).
        loss = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_SUMS_FIELDS = ("corpus", "terms", "chain_share", "whole_share", "chain_answer_share", "tagged_restate_share",
                "plain_chain_share", "restate_share")


def spec_hash(spec: TinyBaseSpec) -> str:
    fields = {k: v for k, v in asdict(spec).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    if spec.corpus == "arithmetic":  # fields of the later `sums` corpus leave the first base's key as it was
        fields = {k: v for k, v in fields.items() if k not in _SUMS_FIELDS}
    payload = json.dumps({**fields, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def ensure_tiny_base(name: str, progress: bool = True) -> Path:
    """Return the directory of built-in base `name`, pretraining and caching it if needed (atomically,
    see `build_once`)."""
    if name not in BUILTIN_BASES:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_BASES)}")
    spec = BUILTIN_BASES[name]

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        pretrain_tiny_base(spec, tmp, progress=progress)
        (tmp / "grpo_zero_base.json").write_text(
            json.dumps({"name": name, "spec": asdict(spec), "seconds": time.perf_counter() - started})
        )

    return build_once(cache_root() / f"{name}-{spec_hash(spec)}", build, marker="config.json")
