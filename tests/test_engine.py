"""Engine behaviour on tiny random-weight checkpoints (issue 2's must-show list)."""

import pytest

from longserve.engine import LLM, EngineError, ModelLoadError, RequestError, SamplingParams
from longserve.engine.testing import tiny_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def make_llm(ckpt, **kw):
    opts = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=512)
    opts.update(kw)
    return LLM(model=str(ckpt), **opts)


def prompts_of_lengths(lengths, vocab=200):
    return [[(7 * i + 3 * j + 1) % vocab + 1 for j in range(n)] for i, n in enumerate(lengths)]


def test_batched_equals_alone(ckpt):
    llm = make_llm(ckpt)
    prompts = prompts_of_lengths([3, 17, 5, 33, 9, 1, 26, 12])
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("chunk", [3, 7, 13])
def test_chunked_prefill_equals_unchunked(ckpt, chunk):
    prompts = prompts_of_lengths([41, 29, 8])
    reference = [o.outputs[0].token_ids for o in make_llm(ckpt).generate(prompts, GREEDY)]
    chunked = make_llm(ckpt, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == reference


def test_prefix_cache_hits_change_nothing(ckpt):
    llm = make_llm(ckpt)
    shared = prompts_of_lengths([40])[0]
    first = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    hits_before = llm.engine.block_manager.prefix_hits
    second = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    assert llm.engine.block_manager.prefix_hits - hits_before >= 40 // 4 - 1
    assert second.num_cached_tokens >= 36
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    cold = make_llm(ckpt, enable_prefix_caching=False).generate([shared + [5, 6, 7]], GREEDY)[0]
    assert cold.outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_keeps_outputs_and_frees_blocks(ckpt):
    prompts = prompts_of_lengths([20, 22, 18, 25, 19, 21])
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in make_llm(ckpt).generate(prompts, params)]
    small = make_llm(ckpt, num_kv_blocks=24)  # 96 tokens of KV for 6 x ~36 tokens
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(r == 0 for r in bm.ref_counts)


def test_seeded_sampling_reproducible_and_n(ckpt):
    llm = make_llm(ckpt)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    a = llm.generate([[1, 2, 3]], params)[0]
    b = llm.generate([[1, 2, 3]], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_request_errors_and_engine_keeps_serving(ckpt):
    llm = make_llm(ckpt, max_model_len=64)
    with pytest.raises(RequestError, match="maximum context length is 64"):
        llm.generate([list(range(1, 70))], GREEDY)
    with pytest.raises(RequestError, match="max_tokens"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=100))
    with pytest.raises(RequestError):
        SamplingParams(temperature=-1)
    ok = llm.generate([[1, 2, 3]], GREEDY)[0]
    assert ok.finished and len(ok.outputs[0].token_ids) == 12
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_request_that_never_fits_the_cache_is_refused(ckpt):
    llm = make_llm(ckpt, num_kv_blocks=4)  # 16 tokens
    with pytest.raises(RequestError, match="KV cache"):
        llm.generate([list(range(1, 15))], SamplingParams(max_tokens=8))


def test_abort_mid_request_returns_blocks(ckpt):
    llm = make_llm(ckpt)
    eng = llm.engine
    rid = eng.add_request(list(range(1, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    other = eng.add_request(list(range(1, 10)), SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(3):
        eng.step()
    out = eng.abort(rid)
    assert out.outputs[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert other not in eng.requests


def test_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not found|does not exist|no such"):
        LLM(model=str(tmp_path / "missing"), device="cpu")
    bad = tiny_checkpoint(tmp_path / "bad", arch="llama")
    cfg = (bad / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (bad / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        LLM(model=str(bad), device="cpu")
    with pytest.raises(EngineError, match="unknown engine option"):
        LLM(model=str(bad), device="cpu", not_an_option=1)


@pytest.mark.slow
def test_64k_prompt_through_chunked_prefill(ckpt):
    """Issue 2, item 7: a 64K-token prompt on CPU (time and peak memory are in docs/benchmarks.md)."""
    n = 65536
    llm = make_llm(ckpt, block_size=64, num_kv_blocks=n // 64 + 8, max_num_batched_tokens=8192,
                   max_model_len=n + 64)
    prompt = [(i * 7919) % 250 + 1 for i in range(n)]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
