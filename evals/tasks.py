"""RULER-style long-context tasks, generated locally and deterministically from a seed.

Every sample is a haystack of prose (evals/data/haystack.txt: plain English about a river town, about 8K tokens,
written for this purpose; or a file given with --haystack) cut to a target token length,
with one or more needles planted at sentence boundaries, a question after the haystack, and an answer
prefix that opens the assistant's turn. The prompt is rendered with the model's chat template (as the server
does). Each answer string occurs exactly once in the prompt; scoring is exact (every answer string must
appear in the output as a whole token run, not inside a longer number or word).

Tasks
  passkey          a 5-digit pass key (several tokens with digit-wise tokenizers)
  niah_single      one "special magic number" for a two-word key
  niah_multikey    the target key's number among 3 distractor keys with their own numbers
  niah_multivalue  4 numbers for the same key; all of them must be in the answer
  vt               variable tracking, 2 hops: VAR A = n, VAR B = VAR A, VAR C = VAR B; "what is C?"
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..policies.profiler import encode

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt")

HAYSTACK_FILE = Path(__file__).resolve().parent / "data" / "haystack.txt"
CALIB_DIR = Path(__file__).resolve().parent.parent / "policies" / "calib"
FIDELITY_FILES = ("eval-python-reference.txt", "python-reference.txt")

INSTRUCTION = ("Below is a long text. Hidden in it is a piece of information you will be asked about. "
               "Read it carefully and answer the question after the text.")

_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faded", "gentle", "hollow", "icy", "jolly", "keen",
               "lofty", "mellow", "narrow", "olive", "proud", "quiet", "rusty", "silver", "tidy", "upper",
               "vivid", "woolen", "young", "zesty", "bold", "crisp", "dim", "even", "fuzzy")
_NOUNS = ("anchor", "badger", "candle", "delta", "ember", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel",
          "umbrella", "valley", "walnut", "yarrow", "zephyr", "basket", "cobalt", "dune", "ferry", "glacier")
_VAR_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass
class Sample:
    """One prompt: token ids, where its evidence sits, and what counts as a right answer."""

    task: str
    length: int  # the target context length in tokens (the prompt is at most this long)
    depth: float  # where the first needle sits, as a fraction of the haystack
    index: int  # sample number within (task, length, depth)
    prompt_ids: list[int]
    answers: list[str]  # every one must appear in the output
    evidence_positions: list[int]  # prompt token positions of the needle text the answer needs
    question_start: int  # first token of the question (the queries that need the evidence start here)
    prompt_text: str = field(repr=False, default="")


def answer_found(answer: str, output: str) -> bool:
    """answer appears in output as a whole run: not inside a longer number or word ("1234" is not in "12345")."""
    return re.search(r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])", output) is not None


def score(sample_answers: list[str], output: str) -> bool:
    return all(answer_found(a, output) for a in sample_answers)


def load_haystack_text() -> str:
    return HAYSTACK_FILE.read_text(encoding="utf-8")


def load_fidelity_text() -> str:
    """The Python language reference texts shipped for HyLRA's calibration (about 17K tokens in all)."""
    return "\n\n".join((CALIB_DIR / name).read_text(encoding="utf-8") for name in FIDELITY_FILES)


def split_sentences(text: str) -> list[str]:
    """Sentences (or lines) with their trailing whitespace, so joining them gives the text back."""
    out: list[str] = []
    for part in re.split(r"((?<=[.!?:])\s+|\n\s*)", text):
        if out and part.isspace():
            out[-1] += part
        elif part:
            out.append(part)
    return out


class TaskBuilder:
    """Builds samples for one tokenizer; the haystack sentences are tokenized once."""

    def __init__(self, tokenizer: Any, haystack_text: str | None = None):
        self.tokenizer = tokenizer
        self.sentences = split_sentences(haystack_text if haystack_text is not None else load_haystack_text())
        self.sentence_tokens = [len(encode(tokenizer, s)) for s in self.sentences]

    # -- prompt rendering ------------------------------------------------------------------------------------
    def render(self, context: str, question: str, answer_prefix: str) -> str:
        """The full prompt text: the user turn in the model's chat template, then the answer prefix."""
        content = f"{INSTRUCTION}\n\n<text>\n{context}\n</text>\n\n{question}"
        messages = [{"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None) is None:  # as engine/llm.py: role-prefixed text
            return f"user: {content}\nassistant:" + " " + answer_prefix
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the rendered prompt (no extra special tokens: the template has them) and their
        character spans."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # -- building ---------------------------------------------------------------------------------------------
    def build(self, task: str, length: int, depth: float, index: int, seed: int) -> Sample:
        """Sample `index` of `task` with its first needle at `depth`: the longest prompt of at most `length`
        tokens from consecutive haystack sentences starting at a random one (wrapping around)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (expected some of {', '.join(TASKS)})")
        rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
        needles, question, prefix, answers, evidence = _TASK_MAKERS[task](rng, depth)
        first = rng.randrange(len(self.sentences))
        order = [(first + j) % len(self.sentences) for j in range(len(self.sentences))]
        total, most = 0, 0
        while most < len(order) and total + self.sentence_tokens[order[most]] <= length:
            total += self.sentence_tokens[order[most]]
            most += 1
        lo, hi, best = 0, most, None
        while lo <= hi:  # binary search for the most sentences that fit (the prompt grows with the count)
            mid = (lo + hi) // 2
            built = self._assemble([self.sentences[j] for j in order[:mid]], needles, question, prefix, evidence)
            if len(built[1]) <= length:
                best, lo = built, mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError(f"a {task} prompt does not fit into {length} tokens even without a haystack")
        text, ids, positions, q_start = best
        if any(text.count(s) != 1 for s in answers + evidence):
            # the haystack happens to contain an answer: draw again with a derived seed
            return self.build(task, length, depth, index, seed + 1_000_003)
        return Sample(task, length, depth, index, ids, answers, positions, q_start, text)

    def _assemble(self, hay: list[str], needles: list[tuple[float, str]], question: str, prefix: str,
                  evidence: list[str]) -> tuple[str, list[int], list[int], int]:
        parts = list(hay)
        total = sum(len(s) for s in parts)
        # Insert from the deepest needle up, so earlier insertions do not shift later insertion points.
        for frac, needle in sorted(needles, key=lambda x: -x[0]):
            target, acc, at = frac * total, 0, len(parts)
            for j, s in enumerate(parts):
                if acc >= target:
                    at = j
                    break
                acc += len(s)
            parts.insert(at, needle + " ")
        context = "".join(parts).strip()
        text = self.render(context, question, prefix)
        ids, offsets = self.tokenize(text)
        positions: set[int] = set()
        for sub in evidence:  # the tokens overlapping each evidence string
            start = text.index(sub)
            positions.update(i for i, (a, b) in enumerate(offsets) if a < start + len(sub) and b > start)
        q_char = text.index(question)
        q_start = next(i for i, (a, b) in enumerate(offsets) if b > q_char)
        return text, ids, sorted(positions), q_start


# -- task makers: (needles [(depth, sentence)], question, answer prefix, answers, evidence substrings) ----------
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _passkey(rng, depth):
    key = _number(rng, 5)
    needle = f"The secret pass key is the number {key}. Remember this number."
    # "the number" matters for small models: asked for "the pass key", SmolLM2-135M describes a key
    question = "What is the secret pass key number mentioned in the text? Answer with the number only."
    return [(depth, needle)], question, "The secret pass key number is", [key], [key]


def _niah_single(rng, depth):
    key, value = _key(rng), _number(rng, 7)
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the text?"
    return [(depth, needle)], question, f"The special magic number for {key} is", [value], [value]


def _niah_multikey(rng, depth):
    keys = []
    while len(keys) < 4:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [_number(rng, 7) for _ in keys]
    needles = [(depth, f"One of the special magic numbers for {keys[0]} is: {values[0]}.")]
    needles += [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys[1:], values[1:])]
    question = f"What is the special magic number for {keys[0]} mentioned in the text?"
    return needles, question, f"The special magic number for {keys[0]} is", [values[0]], [values[0]]


def _niah_multivalue(rng, depth):
    key = _key(rng)
    values = list(dict.fromkeys(_number(rng, 7) for _ in range(4)))
    spots = [depth] + [rng.random() for _ in values[1:]]
    needles = [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(spots, values)]
    question = f"What are all the special magic numbers for {key} mentioned in the text?"
    return needles, question, f"The special magic numbers for {key} are", values, values


def _vt(rng, depth):
    names = rng.sample(_VAR_LETTERS, 3)
    names = [n * 3 for n in names]  # e.g. "QQQ": one unusual token run, not an English word
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    later = sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])
    needles = [(depth, chain[0])] + list(zip(later, chain[1:]))
    question = f"The text assigns values to variables. What is the value of VAR {names[-1]}?"
    return needles, question, f"VAR {names[-1]} =", [value], chain


_TASK_MAKERS: dict[str, Callable] = {"passkey": _passkey, "niah_single": _niah_single,
                                     "niah_multikey": _niah_multikey, "niah_multivalue": _niah_multivalue, "vt": _vt}
