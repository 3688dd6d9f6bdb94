import math
from collections import Counter

import pytest
import torch

from longserve.engine.sampler import SampleResult, Sampler, SamplingRow, make_generator
from longserve.engine.sampling_params import SamplingParams

sampler = Sampler()

# A distribution with clear gaps, so top-p / min-p boundaries are far from rounding.
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02])
LOGITS = PROBS.log()


def sample_support(params: SamplingParams, logits=LOGITS, rows_per_call=500, calls=4, seed=0) -> Counter:
    """Token counts from rows_per_call * calls draws (one seeded generator shared by the rows)."""
    generator = make_generator(seed)
    counts: Counter = Counter()
    for _ in range(calls):
        rows = [SamplingRow(params, generator) for _ in range(rows_per_call)]
        result = sampler(logits.expand(rows_per_call, -1), rows)
        counts.update(result.token_ids)
    return counts


def test_greedy_is_argmax_and_deterministic():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    rows = [SamplingRow(SamplingParams(temperature=0.0), make_generator(i)) for i in range(8)]
    first = sampler(logits, rows)
    assert first.token_ids == logits.argmax(dim=-1).tolist()
    for _ in range(3):
        assert sampler(logits, rows).token_ids == first.token_ids
    # A tie goes to the first maximum, always.
    tied = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    assert sampler(tied, [SamplingRow(SamplingParams(temperature=0.0))]).token_ids == [1]


def test_greedy_rows_mixed_with_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(6, 30)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=5) for i in range(6)]
    rows = [SamplingRow(p, make_generator(i)) for i, p in enumerate(params)]
    result = sampler(logits, rows)
    argmax = logits.argmax(dim=-1).tolist()
    for i in range(0, 6, 2):
        assert result.token_ids[i] == argmax[i]
    for i in range(1, 6, 2):
        assert result.token_ids[i] in logits[i].topk(5).indices.tolist()


def test_plain_sampling_reaches_every_token_with_the_right_frequency():
    counts = sample_support(SamplingParams(temperature=1.0), calls=8)
    assert set(counts) == set(range(len(PROBS)))
    total = sum(counts.values())
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / total - p) < 0.03, (token, counts[token] / total, p)


def test_top_k_restricts_support_and_renormalises():
    counts = sample_support(SamplingParams(top_k=3), calls=8)
    assert set(counts) == {0, 1, 2}
    total = sum(counts.values())
    kept = PROBS[:3] / PROBS[:3].sum()
    for token in range(3):
        assert abs(counts[token] / total - kept[token].item()) < 0.04


def test_top_p_keeps_smallest_prefix_reaching_p():
    # masses before each token: 0, .40, .65, .80, ... -> top_p=0.7 keeps tokens 0, 1, 2
    assert set(sample_support(SamplingParams(top_p=0.7))) == {0, 1, 2}
    # top_p smaller than the best token's probability keeps just that token
    assert set(sample_support(SamplingParams(top_p=0.1))) == {0}


def test_top_p_applies_after_top_k():
    # After top_k=2 the kept probabilities are .615/.385; top_p=0.6 then keeps only token 0. Applied to the
    # full distribution instead, top_p=0.6 would keep tokens 0 and 1 (mass before token 1 is .40).
    assert set(sample_support(SamplingParams(top_k=2, top_p=0.6))) == {0}
    assert set(sample_support(SamplingParams(top_k=2, top_p=0.7))) == {0, 1}


def test_min_p_restricts_support_after_temperature():
    # temperature 1: threshold 0.1 * 0.40 = 0.04 keeps probabilities >= .04: tokens 0..4
    assert set(sample_support(SamplingParams(min_p=0.1))) == {0, 1, 2, 3, 4}
    # temperature 0.5 squares the probabilities: ratios to the best are 1, .39, .14, .0625, ... -> tokens 0..2
    assert set(sample_support(SamplingParams(temperature=0.5, min_p=0.1))) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    cold = sample_support(SamplingParams(temperature=0.25), calls=2)
    hot = sample_support(SamplingParams(temperature=4.0), calls=2)
    # p^(1/T) normalised: at T=0.25 token 0 gets .40^4 / sum = ~0.85 of the mass; at T=4 ~0.21
    assert cold[0] / 1000 > 0.75
    assert 0.13 < hot[0] / 1000 < 0.29
    assert set(hot) == set(range(len(PROBS)))


def penalised_logprobs(params: SamplingParams, logits, prompt, output) -> list[float]:
    """All V logprobs the sampler reports (logprobs=V gives every token)."""
    vocab = logits.shape[-1]
    row = SamplingRow(SamplingParams(**{**params.__dict__, "logprobs": vocab}), make_generator(0),
                      prompt_token_ids=prompt, output_token_ids=output)
    result = sampler(logits.unsqueeze(0), [row])
    by_token = dict(result.top_logprobs[0])
    return [by_token[t] for t in range(vocab)]


def test_penalties_hand_example():
    logits = torch.tensor([2.0, -1.0, 0.5, -2.0, 1.0])
    prompt, output = [0, 1], [2, 2, 3]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # repetition 2 over tokens {0,1,2,3}: [1.0, -2.0, 0.25, -4.0, 1.0]
    # frequency 0.5 * counts {2: 2, 3: 1}: [1.0, -2.0, -0.75, -4.5, 1.0]
    # presence 0.25 on tokens {2, 3}:      [1.0, -2.0, -1.0, -4.75, 1.0]
    expected = torch.log_softmax(torch.tensor([1.0, -2.0, -1.0, -4.75, 1.0]), dim=-1).tolist()
    got = penalised_logprobs(params, logits, prompt, output)
    assert got == pytest.approx(expected, abs=1e-6)

    # Each penalty alone.
    rep = penalised_logprobs(SamplingParams(repetition_penalty=2.0), logits, prompt, output)
    assert rep == pytest.approx(torch.log_softmax(torch.tensor([1.0, -2.0, 0.25, -4.0, 1.0]), -1).tolist(), abs=1e-6)
    freq = penalised_logprobs(SamplingParams(frequency_penalty=-1.0), logits, prompt, output)
    assert freq == pytest.approx(torch.log_softmax(torch.tensor([2.0, -1.0, 2.5, -1.0, 1.0]), -1).tolist(), abs=1e-6)
    pres = penalised_logprobs(SamplingParams(presence_penalty=1.5), logits, prompt, output)
    assert pres == pytest.approx(torch.log_softmax(torch.tensor([2.0, -1.0, -1.0, -3.5, 1.0]), -1).tolist(), abs=1e-6)


def test_penalties_change_greedy_choice_and_leave_other_rows_alone():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=2.0), output_token_ids=[0]),
        SamplingRow(SamplingParams(temperature=0.0), output_token_ids=[0]),
    ]
    original = logits.clone()
    assert sampler(logits, rows).token_ids == [1, 0]
    assert torch.equal(logits, original), "the sampler must not modify the caller's logits"


def test_cached_prompt_tensor_equals_prompt_list():
    torch.manual_seed(2)
    logits = torch.randn(2, 40)
    prompt = [3, 7, 7, 39, 12]
    params = SamplingParams(repetition_penalty=1.7, logprobs=20)
    listed = SamplingRow(params, prompt_token_ids=prompt, output_token_ids=[1])
    cached = SamplingRow(params, prompt_token_ids=prompt, output_token_ids=[1], prompt_token_tensor=torch.tensor(prompt))
    result = sampler(logits[[0, 0]], [listed, cached])
    assert result.top_logprobs[0] == result.top_logprobs[1]


def test_out_of_vocab_ids_are_ignored_by_penalties():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    row = SamplingRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logprobs=3),
                      prompt_token_ids=[5, 1], output_token_ids=[7])
    result = sampler(logits, [row])
    expected = torch.log_softmax(torch.tensor([1.0, 1.0, 3.0]), -1)
    assert dict(result.top_logprobs[0]) == pytest.approx(dict(enumerate(expected.tolist())), abs=1e-6)


def test_same_seed_same_samples_different_seed_different():
    torch.manual_seed(3)
    logits = torch.randn(1, 200)

    def draw(seed, index=0, steps=30):
        generator = make_generator(seed, index)
        return [sampler(logits, [SamplingRow(SamplingParams(), generator)]).token_ids[0] for _ in range(steps)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7, 0) != draw(7, 1)
    # seed+index are mixed, not added
    assert draw(1, 1) != draw(2, 0)


def test_seeded_row_does_not_depend_on_batch_neighbours():
    torch.manual_seed(4)
    logits = torch.randn(5, 100)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    alone = sampler(logits[2:3], [SamplingRow(params, make_generator(42))]).token_ids[0]
    rows = [SamplingRow(params, make_generator(42) if i == 2 else None) for i in range(5)]
    rows[0] = SamplingRow(SamplingParams(temperature=0.0), make_generator(1))
    together = sampler(logits, rows).token_ids[2]
    assert alone == together


def test_min_tokens_suppresses_eos_and_stop_token_ids():
    eos, stop = 4, 3
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 10.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop])

    def pick(output, **kwargs):
        row = SamplingRow(kwargs.pop("params", params), output_token_ids=output, eos_token_ids={eos}, **kwargs)
        return sampler(logits, [row])

    early = pick([1, 1])
    assert early.token_ids == [2]
    assert early.logprobs[0] == pytest.approx(torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)[2].item())
    assert pick([1, 1, 1]).token_ids == [eos]  # min_tokens reached
    assert pick([1, 1, 1], below_min_tokens=True).token_ids == [2]  # the engine's flag wins
    # ignore_eos: EOS is an ordinary token, only the stop token id is held back
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    assert pick([], params=ignore).token_ids == [eos]
    # sampled rows never draw a suppressed token either
    sampled = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop])
    generator = make_generator(5)
    rows = [SamplingRow(sampled, generator, output_token_ids=[], eos_token_ids={eos}) for _ in range(300)]
    assert not {eos, stop} & set(sampler(logits.expand(300, -1), rows).token_ids)


def test_logprobs_equal_log_softmax_of_raw_logits():
    torch.manual_seed(5)
    logits = torch.randn(4, 64) * 3
    params = [SamplingParams(temperature=0.7, top_k=10, logprobs=5), SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=0.0, logprobs=20)]
    rows = [SamplingRow(p, make_generator(i)) for i, p in enumerate(params)]
    result = sampler(logits, rows)
    assert isinstance(result, SampleResult)
    reference = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-5)
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []
    for i, k in ((0, 5), (3, 20)):
        values, indices = reference[i].topk(k)
        assert [t for t, _ in result.top_logprobs[i]] == indices.tolist()
        assert [v for _, v in result.top_logprobs[i]] == pytest.approx(values.tolist(), abs=1e-5)
    # greedy row's token is its top logprob
    assert result.top_logprobs[3][0][0] == result.token_ids[3]


def test_make_generator_reproducible_and_validated():
    a = torch.rand(5, generator=make_generator(123, 2))
    b = torch.rand(5, generator=make_generator(123, 2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        make_generator(1, -1)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="2 logit rows but 1"):
        sampler(torch.zeros(2, 4), [SamplingRow(SamplingParams())])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sampler(torch.zeros(4), [SamplingRow(SamplingParams())])
    empty = sampler(torch.zeros(0, 4), [])
    assert empty.token_ids == [] and empty.logprobs == [] and empty.top_logprobs == []


def test_half_precision_logits_are_upcast():
    logits = torch.tensor([[0.5, 2.0, -1.0]], dtype=torch.float16)
    result = sampler(logits, [SamplingRow(SamplingParams(temperature=0.0, logprobs=1))])
    assert result.token_ids == [1]
    expected = torch.log_softmax(logits.float(), -1)[0, 1].item()
    assert math.isclose(result.logprobs[0], expected, abs_tol=1e-6)


def test_rows_with_different_truncations_in_one_batch():
    generator = make_generator(11)
    configs = [SamplingParams(), SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(top_k=4, min_p=0.3)]
    per = 400
    rows = [SamplingRow(p, generator) for p in configs for _ in range(per)]
    tokens = sampler(LOGITS.expand(len(rows), -1), rows).token_ids
    supports = [set(tokens[i * per:(i + 1) * per]) for i in range(len(configs))]
    # min_p 0.3 after top_k=4: threshold .3 * .40 = .12 keeps tokens 0, 1, 2
    assert supports == [set(range(len(PROBS))), {0, 1}, {0, 1, 2}, {0, 1, 2}]
