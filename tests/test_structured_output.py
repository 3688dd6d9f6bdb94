"""Structured outputs and tool calling without a server: the grammar cache, the sampler's batched grammar mask and
logit_bias, the engine's grammar hooks (offline LLM), the tool-call parsers, and the one prompt check."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from longserve.engine.errors import RequestError
from longserve.engine.sampler import Sampler, SamplingRow
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.structured_output import GrammarCache, StructuredOutput
from longserve.engine.testing import TINY_VOCAB_SIZE
from longserve.server.tool_calls import PARSERS, parser_for_checkpoint

PADDED_VOCAB = TINY_VOCAB_SIZE + 7  # model rows the tokenizer does not have
EOS = 2
SCHEMA = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
          "required": ["k", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from longserve.engine.testing import write_tiny_tokenizer

    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture()
def grammars(tokenizer) -> GrammarCache:
    return GrammarCache(tokenizer, PADDED_VOCAB, [EOS])


def test_compiled_once_per_distinct_spec(grammars):
    spec = StructuredOutput.json(SCHEMA)
    first = grammars.compile(spec)
    assert grammars.compile(StructuredOutput.json(SCHEMA)) is first and grammars.compilations == 1
    grammars.compile(StructuredOutput.json(SCHEMA, prefix="<x>"))
    assert grammars.compilations == 2


@pytest.mark.parametrize("schema,named", [({"type": "strin"}, "strin"), ({"$ref": "#/missing"}, "missing"),
                                          ({"type": "object", "required": 5}, "required")])
def test_uncompilable_schema_is_a_request_error_naming_it(grammars, schema, named):
    with pytest.raises(RequestError) as info:
        grammars.compile(StructuredOutput.json(schema))
    assert info.value.param == "response_format" and named in str(info.value)
    assert "\n" not in str(info.value) and ".cc:" not in str(info.value)  # one line, no C++ source location


def _generate(grammars, tokenizer, spec, seed: int, steps: int = 200) -> str:
    """Sample random logits through the Sampler with the grammar until it terminates."""
    state = grammars.matcher(spec)
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(1, PADDED_VOCAB, generator=gen) * 4
        logits[0, TINY_VOCAB_SIZE:] = 50.0  # padding rows the model favours: the grammar must still forbid them
        row = SamplingRow(SamplingParams(temperature=1.0, structured_output=spec), grammar=state,
                          eos_token_ids={EOS})
        token = Sampler()(logits, [row]).token_ids[0]
        assert state.accept(token)
        if state.is_terminated:
            assert token == EOS
            return tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"the grammar did not end in {steps} tokens: {tokenizer.decode(tokens)!r}")


@pytest.mark.parametrize("seed", range(4))
def test_sampled_outputs_validate(grammars, tokenizer, seed):
    strings = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}, "required": ["s"]}
    for schema in (SCHEMA, strings):
        text = _generate(grammars, tokenizer, StructuredOutput.json(schema), seed)
        jsonschema.validate(json.loads(text), schema)  # strict JSON: no raw control characters either


def test_mask_applies_to_constrained_rows_only(grammars, tokenizer):
    spec = StructuredOutput.json(SCHEMA)
    logits = torch.randn(3, PADDED_VOCAB, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0.0)
    rows = [SamplingRow(greedy), SamplingRow(SamplingParams(temperature=0.0, structured_output=spec),
                                             grammar=grammars.matcher(spec)), SamplingRow(greedy)]
    result = Sampler()(logits, rows)
    plain = logits.argmax(dim=-1).tolist()
    assert result.token_ids[0] == plain[0] and result.token_ids[2] == plain[2]
    assert tokenizer.decode([result.token_ids[1]]) == "{"  # the only token a JSON object can start with
    assert result.logprobs[1] == pytest.approx(0.0, abs=1e-5)  # it had all the probability left


def test_logit_bias_batched(tokenizer):
    logits = torch.zeros(3, 10)
    rows = [SamplingRow(SamplingParams(temperature=0.0, logit_bias={7: 100, 3: -100})),
            SamplingRow(SamplingParams(temperature=0.0)),
            SamplingRow(SamplingParams(temperature=1.0, seed=1, logit_bias={4: 100.0}))]
    result = Sampler()(logits, rows)
    assert result.token_ids == [7, 0, 4]
    assert logits.abs().sum() == 0  # the caller's logits are untouched


@pytest.mark.parametrize("bias", [{-1: 1.0}, {3: 100.5}, {3: float("nan")}, {"3": 1.0}, {3: True}])
def test_logit_bias_checked(bias):
    with pytest.raises(RequestError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"


def test_offline_llm_structured_output_and_prompt_checks(tmp_path):
    from longserve.engine.llm import LLM
    from longserve.engine.testing import tiny_checkpoint

    llm = LLM(str(tiny_checkpoint(tmp_path / "m", vocab_size=PADDED_VOCAB)), device="cpu", dtype="float32",
              num_kv_blocks=64, block_size=4)
    spec = StructuredOutput.json(SCHEMA)
    # min_tokens and ignore_eos do not keep a finished grammar going: the output ends where the JSON does.
    params = SamplingParams(n=2, max_tokens=60, temperature=1.0, seed=3, structured_output=spec, min_tokens=30,
                            ignore_eos=True)
    (out,) = llm.generate("hello", params)
    for c in out.outputs:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks

    # The engine's public API still refuses bad token ids, once, before anything is queued.
    for bad in ([1, PADDED_VOCAB], [1, -1], [1, 2.5], []):
        with pytest.raises(RequestError):
            llm.generate([bad], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate("hi", SamplingParams(max_tokens=2, logit_bias={PADDED_VOCAB: 1.0}))
    assert not llm.engine.has_unfinished()


def test_each_prompt_checked_once(tmp_path, monkeypatch):
    """LLM.generate and AsyncEngine.generate check a prompt once; the engine trusts a validated request."""
    import asyncio

    from longserve.engine.async_engine import AsyncEngine
    from longserve.engine.config import EngineConfig
    from longserve.engine.llm import LLM
    from longserve.engine.llm_engine import LLMEngine
    from longserve.engine.testing import tiny_checkpoint

    checks = []
    original = LLMEngine.validate_request
    monkeypatch.setattr(LLMEngine, "validate_request", lambda self, ids, p: (checks.append(len(ids)),
                                                                              original(self, ids, p))[1])
    config = EngineConfig.from_kwargs(model=str(tiny_checkpoint(tmp_path / "m")), device="cpu", dtype="float32",
                                      num_kv_blocks=64, block_size=4)
    engine = AsyncEngine(config)
    try:
        async def run(**kw):
            return [out async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=2), **kw)][-1]

        assert asyncio.run(run()).finished and checks == [3]
        checks.clear()
        engine.validate([5, 6, 7, 8], SamplingParams(max_tokens=2))  # the server's one check ...
        assert asyncio.run(run(validated=True)).finished and checks == [4]  # ... and no other
    finally:
        engine.shutdown()
    checks.clear()
    LLM.from_config(config).generate([[5, 6], [7, 8, 9]], SamplingParams(max_tokens=2))
    assert checks == [2, 3]


# ----------------------------------------------------------------------------------------------------------
# Tool-call parsers


def test_hermes_parser():
    hermes = PARSERS["hermes"]
    text = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>')
    content, calls = hermes.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2
    assert hermes.parse("no call here") == ("no call here", [])
    assert hermes.parse("<tool_call>\n{not json}\n</tool_call>")[1] == []  # shown as text, not dropped
    # Unterminated last block (the model stopped at EOS right after the JSON).
    assert hermes.parse('<tool_call>\n{"name": "f", "arguments": {}}')[1][0].name == "f"
    # Streaming: text is held back from where a call may start, including a marker cut between chunks.
    assert hermes.held_from("Sure <tool") == 5 and hermes.held_from("Sure <tool_call>{") == 5
    assert hermes.held_from("Sure") == 4 and hermes.held_from("a < b") == 5


def test_llama3_json_parser():
    llama = PARSERS["llama3_json"]
    content, calls = llama.parse('<|python_tag|>{"name": "f", "parameters": {"x": "a;b"}}; {"name": "g", '
                                 '"parameters": {}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": "a;b"}), ("g", {})]
    assert llama.parse("Hello {") == ("Hello {", [])
    assert llama.parse('{"name": 3}') == ('{"name": 3}', [])
    assert llama.held_from("  {") == 0 and llama.held_from("Hi") == 2 and llama.held_from("") == 0


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_call_grammar_accepts_the_parsers_format(grammars, name):
    parser = PARSERS[name]
    functions = [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"], "additionalProperties": False}},
                 {"name": "g"}]
    state = grammars.matcher(parser.call_grammar(functions))
    written = parser.format_call("f", {"a": 12})
    assert state.matcher.accept_string(written) and state.matcher.accept_token(EOS) and state.is_terminated
    assert parser.parse(written)[1][0].name == "f"
    other = grammars.matcher(parser.call_grammar(functions))
    assert not other.matcher.accept_string(parser.format_call("h", {}))  # not an offered function


def test_parser_chosen_from_the_chat_template():
    assert parser_for_checkpoint("{{ '<tool_call>' }}").name == "hermes"  # Qwen2.5 / Qwen3
    assert parser_for_checkpoint("<|start_header_id|>ipython<|end_header_id|>").name == "llama3_json"
    assert parser_for_checkpoint("<|im_start|>{{ m['content'] }}").name == "hermes"
    assert parser_for_checkpoint(None).name == "hermes"


def test_tool_call_parser_flag(tokenizer):
    from types import SimpleNamespace

    from longserve.server.app import create_app
    from longserve.server.cli import build_parser

    engine = SimpleNamespace(tokenizer=tokenizer, model_name="m", max_model_len=16, dead=None, num_unfinished=0,
                             config=SimpleNamespace(max_waiting=1, max_num_seqs=1), stats=lambda: None)
    assert create_app(engine).state.longserve.tool_parser.name == "hermes"  # the tiny ChatML template
    assert create_app(engine, tool_call_parser="llama3_json").state.longserve.tool_parser.name == "llama3_json"
    parser = build_parser()
    assert parser.parse_args(["serve", "--tool-call-parser", "llama3_json"]).tool_call_parser == "llama3_json"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--tool-call-parser", "xml"])
