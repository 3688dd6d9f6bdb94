"""Structured outputs, tool calling and logit_bias through the official openai client against a live server on a
tiny random-weight checkpoint.

The checkpoint is crafted: its model vocabulary is padded past the tokenizer's (the grammar must never allow the
padding rows), and its tokenizer has one extra token holding a whole Hermes tool call, so logit_bias can make the
random model answer with a call and "auto" tool choice can be seen parsing it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from test_server import MODEL_NAME, assert_openai_error, serve_module

CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MODEL_VOCAB_PADDING = 13  # model rows beyond the tokenizer's vocabulary

OBJECT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}
ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
        "additionalProperties": False}
NESTED = {"type": "object", "properties": {"user": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
    "required": ["id", "tags"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False}
SCHEMAS = {"object": OBJECT, "array": ARRAY, "enum": ENUM, "nested": NESTED}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

MAX_TOKENS = 160  # enough for every schema above, even one random byte-level token at a time
USER = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def crafted_model(tmp_path_factory) -> Path:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from longserve.engine.testing import TINY_VOCAB_SIZE, tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("structured-model") / "llama", arch="llama",
                           vocab_size=TINY_VOCAB_SIZE + 1 + MODEL_VOCAB_PADDING)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([AddedToken(CALL_TEXT, special=False, normalized=False)])
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(crafted_model, tmp_path_factory):
    yield from serve_module(crafted_model, tmp_path_factory.mktemp("structured-log"), "--max-model-len", "2048",
                            "--block-size", "4", "--num-kv-blocks", "2048", "--max-num-seqs", "16")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def call_token(server) -> int:
    tokens = httpx.post(server.base + "/tokenize", json={"prompt": CALL_TEXT, "add_special_tokens": False}).json()
    assert len(tokens["tokens"]) == 1, tokens
    return tokens["tokens"][0]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)  # json.loads is strict: no raw control characters


# ----------------------------------------------------------------------------------------------------------
# response_format


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_chat_json_schema_answers_validate(client, kind):
    schema = SCHEMAS[kind]
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format=json_schema_format(schema),
                                       max_tokens=MAX_TOKENS, temperature=1.0, seed=11, n=2)
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        assert_valid(choice.message.content, schema)

    streamed: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=MAX_TOKENS,
                                                response_format=json_schema_format(schema), temperature=1.0,
                                                seed=11, n=2, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert finish == {0: "stop", 1: "stop"}
    assert [streamed[0], streamed[1]] == [c.message.content for c in r.choices]  # same seed, same answers


@pytest.mark.parametrize("kind", ["object", "nested"])
def test_completions_json_schema_plain_and_streaming(client, kind):
    schema = SCHEMAS[kind]
    kwargs = dict(model=MODEL_NAME, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=0.8, seed=5, n=2,
                  extra_body={"response_format": json_schema_format(schema)})
    r = client.completions.create(**kwargs)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert_valid(choice.text, schema)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[0], streamed[1]] == [c.text for c in r.choices]


def test_json_object(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, response_format={"type": "json_object"},
                                       max_tokens=MAX_TOKENS, temperature=0, logit_bias=_bias_towards("}"))
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def _bias_towards(char: str) -> dict:
    """Favour a character, so an unconstrained JSON object closes early on a random model."""
    return {str(_byte_token(char.encode())): 30}


def _byte_token(raw: bytes) -> int:
    """The tiny byte-level tokenizer's id of the token for one byte."""
    from longserve.engine.testing import SPECIAL_TOKENS

    # Byte-level BPE's byte -> character map: printable bytes stand for themselves, the rest get 256, 257, ...
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    (byte,) = raw
    alphabet = sorted(char.values())  # the tokenizer's vocabulary: the specials, then this alphabet in order
    return len(SPECIAL_TOKENS) + alphabet.index(char[byte])


def test_stop_strings_and_max_tokens_as_without_a_grammar(client):
    body = dict(model=MODEL_NAME, messages=USER, response_format=json_schema_format(OBJECT), temperature=0)
    full = client.chat.completions.create(max_tokens=MAX_TOKENS, **body).choices[0].message.content
    assert_valid(full, OBJECT)
    cut = client.chat.completions.create(max_tokens=MAX_TOKENS, stop=[", "], **body).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(", ")]
    short = client.chat.completions.create(max_tokens=3, **body).choices[0]
    assert short.finish_reason == "length" and full.startswith(short.message.content)


# ----------------------------------------------------------------------------------------------------------
# Tool calling


def _check_call(call, allowed: set[str]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tool_choice_required_always_gives_a_valid_call(client, seed):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, n=2,
                                       max_tokens=MAX_TOKENS)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0], {"get_weather", "add"})


def test_named_tool_choice_calls_that_function_streaming(client):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "1 + 2?"}], tools=TOOLS, stream=True,
            tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0, seed=4,
            max_tokens=MAX_TOKENS):
        for ch in chunk.choices:
            for delta in ch.delta.tool_calls or []:  # accumulated as OpenAI's streaming clients do
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS["add"])


def test_auto_parses_a_call_in_the_output(client, call_token):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=TOOLS, max_tokens=1, temperature=0,
                                       logit_bias={str(call_token): 100})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    # The same through streaming, and with tool_choice="none" the text stays content.
    deltas = [ch.delta for chunk in client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=1,
        temperature=0, logit_bias={str(call_token): 100}, stream=True) for ch in chunk.choices]
    assert not any(d.content for d in deltas)
    names = [tc.function.name for d in deltas for tc in d.tool_calls or [] if tc.function and tc.function.name]
    assert names == ["get_weather"]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}],
                                           tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0,
                                           logit_bias={str(call_token): 100}).choices[0]
    assert plain.message.content == CALL_TEXT and not plain.message.tool_calls and plain.finish_reason == "length"


def test_auto_without_a_call_is_content(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "length" and choice.message.content


def test_tool_results_accepted_in_the_next_request(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}],
                                           tools=TOOLS, tool_choice="required", temperature=0,
                                           max_tokens=MAX_TOKENS).choices[0].message
    call = first.tool_calls[0]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=4,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason in ("length", "tool_calls")
    # The conversation (tool list, the call, its result) is all in the prompt.
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages[:1], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + len(call.function.arguments)


# ----------------------------------------------------------------------------------------------------------
# logit_bias


def test_logit_bias_plus_100_makes_greedy_output_that_token(client):
    token = _byte_token(b"Q")
    r = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=6, temperature=0,
                                  logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "Q" * 6
    chat = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=5, temperature=0.7, seed=1,
                                          logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == "Q" * 5
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6, temperature=0,
                                            logprobs=True, extra_body={"ignore_eos": True}).choices[0]
    first = _byte_token(bytes(greedy.logprobs.content[0].bytes))
    banned = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6, temperature=0,
                                            logprobs=True, logit_bias={str(first): -100},
                                            extra_body={"ignore_eos": True}).choices[0]
    assert all(_byte_token(bytes(t.bytes)) != first for t in banned.logprobs.content)


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: a 4xx in OpenAI's shape each, and the server keeps serving

CHAT = "/v1/chat/completions"
C = "/v1/completions"
BASE_CHAT = {"model": MODEL_NAME, "messages": USER, "max_tokens": 4}

BAD = [
    ("schema the grammar library cannot compile", CHAT,
     {**BASE_CHAT, "response_format": json_schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})},
     "response_format", "strin"),
    ("schema with a dangling $ref", C,
     {"model": MODEL_NAME, "prompt": "x", "response_format": json_schema_format({"$ref": "#/nowhere"})},
     "response_format", "nowhere"),
    ("json_schema without its json_schema", CHAT, {**BASE_CHAT, "response_format": {"type": "json_schema"}},
     "response_format", None),
    ("unknown response_format type", CHAT, {**BASE_CHAT, "response_format": {"type": "yaml"}}, "response_format",
     None),
    ("tool with a bad parameters schema", CHAT,
     {**BASE_CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools", "strin"),
    ("tool_choice naming an unknown function", CHAT,
     {**BASE_CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("tool_choice without tools", CHAT, {**BASE_CHAT, "tool_choice": "required"}, "tool_choice", None),
    ("bad tool_choice string", CHAT, {**BASE_CHAT, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
    ("tool message without tool_call_id", CHAT,
     {**BASE_CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages", None),
    ("logit_bias token id outside the vocabulary", C,
     {"model": MODEL_NAME, "prompt": "x", "logit_bias": {"100000": 5}}, "logit_bias", None),
    ("logit_bias key not a token id", CHAT, {**BASE_CHAT, "logit_bias": {"abc": 5}}, "logit_bias", None),
    ("logit_bias negative token id", CHAT, {**BASE_CHAT, "logit_bias": {"-1": 5}}, "logit_bias", None),
    ("logit_bias value above 100", C, {"model": MODEL_NAME, "prompt": "x", "logit_bias": {"5": 101}},
     "logit_bias", None),
    ("logit_bias value not a number", CHAT, {**BASE_CHAT, "logit_bias": {"5": "high"}}, "logit_bias", None),
]


@pytest.mark.parametrize("name,path,body,param,named", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(server, name, path, body, param, named):
    error = assert_openai_error(httpx.post(server.base + path, json=body, timeout=60), 400)
    assert error["param"] == param, error
    if named:
        assert named in error["message"], error
    assert httpx.get(server.base + "/health").status_code == 200
    ok = httpx.post(server.base + CHAT, json=BASE_CHAT, timeout=60)
    assert ok.status_code == 200, ok.text
