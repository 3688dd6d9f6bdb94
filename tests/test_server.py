"""The HTTP server against a real `longserve serve` process on 127.0.0.1 with a tiny random-weight model.

Issue 3's must-show list: the openai client (completions, chat, streaming, n=2, seeds, usage), a table of bad
requests with their 4xx in OpenAI's error shape, 32 concurrent streams of which 8 disconnect, property-based
fuzzing without any 5xx, and the quickstart of docs/server.md run as written.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"  # served under the quickstart's name, so docs/server.md runs unchanged
MAX_MODEL_LEN = 128
MAX_REQUEST_BYTES = 65536


# ----------------------------------------------------------------------------------------------------------
# The server process (test_server_lifecycle.py starts its own with ServerProcess)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`longserve serve` as a subprocess; its log goes to a file shown when something fails."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "longserve.server.cli", "serve", "--model", str(model_dir), "--device", "cpu",
               "--dtype", "float32", "--port", str(self.port), *args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from longserve.engine.testing import tiny_checkpoint

    return Path(tiny_checkpoint(tmp_path_factory.mktemp("server-model") / "llama", arch="llama"))


def serve_module(model_dir: Path, log_dir: Path, *args: str):
    """A module's server fixture body: start, yield the healthy server, then check it stopped cleanly and that
    nothing the tests sent (bad requests, fuzzing, disconnects) made it log a crash."""
    proc = ServerProcess(model_dir, log_dir / "server.log", "--served-model-name", MODEL_NAME, *args)
    proc.wait_healthy()
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code} after SIGTERM:\n{proc.log_tail()}"
    assert "Traceback" not in proc.log_path.read_text(), proc.log_tail(20000)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    yield from serve_module(tiny_model, tmp_path_factory.mktemp("server-log"), "--max-model-len", str(MAX_MODEL_LEN),
                            "--block-size", "4", "--num-kv-blocks", "2048", "--max-num-seqs", "64",
                            "--max-request-bytes", str(MAX_REQUEST_BYTES))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.base + path, json=body, timeout=60, **kw)


def metric(server, name: str, labels: str = "") -> float:
    """A sample's value from /metrics (labels: extra label text, e.g. 'finished_reason="length",')."""
    text = httpx.get(server.base + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}model_name=\"{MODEL_NAME}\"\}} (\S+)$",
                         re.MULTILINE)
    match = pattern.search(text)
    assert match, f"{name}{{{labels}...}} not in /metrics:\n{text[:3000]}"
    return float(match.group(1))


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "Traceback" not in error["message"]
    return error


def prompt_token_count(server, **body) -> int:
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


NO_EOS = {"ignore_eos": True}


# ----------------------------------------------------------------------------------------------------------
# 1. The official openai client


def test_models_and_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert httpx.get(server.base + "/version").json()["version"]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


def test_completion_usage_matches_token_counts(server, client):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=7, temperature=0, logprobs=2,
                                  extra_body=NO_EOS)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL_NAME
    choice = r.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert r.usage.prompt_tokens == prompt_token_count(server, prompt=prompt)
    assert r.usage.completion_tokens == 7 == len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_chat_usage_matches_token_counts(server, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=NO_EOS)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == prompt_token_count(server, messages=messages)
    assert r.usage.completion_tokens == 6 == len(choice.logprobs.content)
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)


def test_completion_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                  max_completion_tokens=10, temperature=0, extra_body=NO_EOS)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n2_and_seeded_sampling_reproducible(client):
    kwargs = dict(model=MODEL_NAME, prompt="Roses are red", max_tokens=8, temperature=1.0, n=2, extra_body=NO_EOS)
    a = client.completions.create(seed=1234, **kwargs)
    b = client.completions.create(seed=1234, **kwargs)
    c = client.completions.create(seed=4321, **kwargs)
    assert [ch.index for ch in a.choices] == [0, 1]
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a)[0] != texts(a)[1]  # two samples of one request differ
    assert texts(a) != texts(c)
    assert a.usage.completion_tokens == 16

    chat = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0,
                n=2, seed=7, extra_body=NO_EOS)
    x = client.chat.completions.create(**chat)
    y = client.chat.completions.create(**chat)
    assert [ch.message.content for ch in x.choices] == [ch.message.content for ch in y.choices]
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **chat):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[0], streamed[1]] == [ch.message.content for ch in x.choices]


def test_prompt_forms_echo_and_stop(server, client):
    ids = post(server, "/tokenize", {"prompt": "alpha beta"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL_NAME, prompt="alpha beta", max_tokens=5, temperature=0,
                                        extra_body=NO_EOS)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL_NAME, prompt=["alpha beta", "gamma"], max_tokens=5, temperature=0,
                                      n=2, extra_body=NO_EOS)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + prompt_token_count(server, prompt="gamma")
    both = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=5, temperature=0,
                                     extra_body=NO_EOS)
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2
    echoed = client.completions.create(model=MODEL_NAME, prompt="alpha beta", max_tokens=5, temperature=0, echo=True,
                                       extra_body=NO_EOS)
    assert echoed.choices[0].text == "alpha beta" + by_text.choices[0].text
    streamed_batch: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=["alpha beta", "gamma"], max_tokens=5,
                                           temperature=0, stream=True, echo=True, extra_body=NO_EOS):
        for ch in chunk.choices:
            streamed_batch[ch.index] = streamed_batch.get(ch.index, "") + ch.text
    assert streamed_batch[0] == echoed.choices[0].text and streamed_batch[1].startswith("gamma")

    # A stop string cut from the greedy text: the output ends right before it, with finish_reason stop.
    text = client.completions.create(model=MODEL_NAME, prompt="stop test", max_tokens=20, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    cut = next((i for i in range(3, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]
                and text.find(text[i:i + 2]) == i), None)
    assert cut is not None, text
    stopped = client.completions.create(model=MODEL_NAME, prompt="stop test", max_tokens=20, temperature=0,
                                        stop=[text[cut:cut + 2]], extra_body=NO_EOS).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]


def test_detokenize_roundtrip(server):
    tokens = post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"] == "hello world"


# ----------------------------------------------------------------------------------------------------------
# 2. Bad requests: each gets its 4xx in OpenAI's error shape, and the server stays healthy

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def completion(**changes):
    return {**OK_COMPLETION, **changes}


def chat(**changes):
    return {**OK_CHAT, **changes}


LONG_PROMPT = " ".join(["word"] * (MAX_MODEL_LEN * 2))

# (name, method, path, body: dict, or bytes sent as they are, expected status, expected param or None)
BAD_REQUESTS = [
    ("malformed JSON", "POST", C, b'{"model": "x", "prompt": ', 400, None),
    ("body is a JSON array", "POST", C, b"[1, 2]", 400, None),
    ("empty body", "POST", CHAT, b"", 400, None),
    ("NaN temperature", "POST", C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("prompt of wrong type", "POST", C, completion(prompt=123), 400, "prompt"),
    ("prompt list mixing types", "POST", C, completion(prompt=["a", 1]), 400, "prompt"),
    ("empty prompt list", "POST", C, completion(prompt=[]), 400, "prompt"),
    ("more prompts than the server can ever queue", "POST", C, completion(prompt=[[1]] * 1100), 400, "prompt"),
    ("missing prompt", "POST", C, {"model": MODEL_NAME}, 400, "prompt"),
    ("prompt token id outside the vocabulary", "POST", C, completion(prompt=[1, 10**9]), 400, "prompt"),
    ("max_tokens as a string", "POST", C, completion(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens as a float", "POST", C, completion(max_tokens=2.5), 400, "max_tokens"),
    ("negative max_tokens", "POST", C, completion(max_tokens=-1), 400, "max_tokens"),
    ("zero max_tokens", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", "POST", C, completion(max_tokens=10**12), 400, "max_tokens"),
    ("n = 0", "POST", C, completion(n=0), 400, "n"),
    ("n too large", "POST", CHAT, chat(n=100000), 400, "n"),
    ("temperature < 0", "POST", C, completion(temperature=-0.5), 400, "temperature"),
    ("temperature as a bool", "POST", C, completion(temperature=True), 400, "temperature"),
    ("top_p = 0", "POST", C, completion(top_p=0), 400, "top_p"),
    ("top_p > 1", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_k < -1", "POST", C, completion(top_k=-5), 400, "top_k"),
    ("presence_penalty out of range", "POST", C, completion(presence_penalty=3), 400, "presence_penalty"),
    ("logprobs too many", "POST", C, completion(logprobs=50), 400, "logprobs"),
    ("echo with logprobs", "POST", C, completion(echo=True, logprobs=1), 400, "logprobs"),
    ("seed as a string", "POST", C, completion(seed="abc"), 400, "seed"),
    ("empty stop string", "POST", C, completion(stop=[""]), 400, "stop"),
    ("stop token id outside the vocabulary", "POST", C, completion(stop_token_ids=[10**9]), 400, "stop_token_ids"),
    ("stream_options without stream", "POST", C, completion(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("unknown model", "POST", C, completion(model="gpt-17"), 404, "model"),
    ("unknown model (chat)", "POST", CHAT, chat(model="gpt-17"), 404, "model"),
    ("prompt longer than the context", "POST", C, completion(prompt=LONG_PROMPT), 400, "prompt"),
    ("prompt + max_tokens longer than the context", "POST", CHAT, chat(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("missing messages", "POST", CHAT, {"model": MODEL_NAME}, 400, "messages"),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("bad role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("user message without content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages"),
    ("content of wrong type", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("image content part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages"),
    ("legacy functions", "POST", CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("tool without a function", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools"),
    ("logit_bias token id outside the vocabulary", "POST", CHAT, chat(logit_bias={"100000": 10}), 400, "logit_bias"),
    ("response_format of an unknown type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400,
     "response_format"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat logprobs as an int", "POST", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("suffix", "POST", C, completion(suffix="end"), 400, "suffix"),
    ("oversized body", "POST", C, completion(prompt="x" * (MAX_REQUEST_BYTES + 10)), 413, None),
    ("unknown route", "GET", "/v1/nothing-here", None, 404, None),
    ("wrong method", "GET", C, None, 405, None),
    ("unknown model id", "GET", "/v1/models/gpt-17", None, 404, "model"),
    ("tokenize with neither prompt nor messages", "POST", "/tokenize", {}, 400, "prompt"),
    ("detokenize a negative id", "POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


def test_bad_request_table_has_enough_rows():
    assert len(BAD_REQUESTS) >= 25
    assert len({row[0] for row in BAD_REQUESTS}) == len(BAD_REQUESTS)


@pytest.mark.parametrize("name,method,path,body,status,param", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request(server, name, method, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.request(method, server.base + path, content=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    else:
        r = httpx.request(method, server.base + path, json=body, timeout=30)
    error = assert_openai_error(r, status)
    if param is not None:
        assert error["param"] == param, error
    if name.startswith("prompt longer") or name.startswith("prompt + max_tokens"):
        assert error["code"] == "context_length_exceeded"
        numbers = [int(x) for x in re.findall(r"\d+", error["message"])]
        assert MAX_MODEL_LEN in numbers and any(x > MAX_MODEL_LEN for x in numbers), error["message"]
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_bad_streaming_request_is_an_http_error(server):
    r = post(server, C, completion(max_tokens=10**6, stream=True))
    assert_openai_error(r, 400)
    r = post(server, CHAT, chat(n=0, stream=True))
    assert_openai_error(r, 400)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_openapi_schema_lists_request_bodies(server):
    schema = httpx.get(server.base + "/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ----------------------------------------------------------------------------------------------------------
# 3. 32 concurrent streams, 8 of which disconnect midway


def _sse_events(lines: list[str]) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


async def _stream(base: str, body: dict, disconnect_after: int | None) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        async with http.stream("POST", CHAT if "messages" in body else C, json=body) as response:
            assert response.status_code == 200, await response.aread()
            text, events, done, finish = "", 0, False, None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                events += 1
                for ch in chunk["choices"]:
                    text += ch["text"]
                    finish = ch["finish_reason"] or finish
                if disconnect_after is not None and events >= disconnect_after:
                    return {"disconnected": True, "events": events}  # leaving the block closes the connection
    return {"disconnected": False, "text": text, "done": done, "finish": finish}


def test_32_concurrent_streams_with_8_disconnects(server, client):
    prompts = ["The ocean is", "My favourite food", "In the year 3000", "Programming is"]
    short = dict(max_tokens=16, temperature=0, ignore_eos=True, stream=True)
    long = dict(max_tokens=96, temperature=0, ignore_eos=True, stream=True)  # still running when they leave
    bodies = []
    for i in range(32):
        leaves = i % 4 == 3
        bodies.append(({"model": MODEL_NAME, "prompt": prompts[i % 4], **(long if leaves else short)},
                       3 if leaves else None))
    aborted_before = metric(server, "longserve:request_aborted_total")

    async def run_all():
        return await asyncio.gather(*[_stream(server.base, body, leave) for body, leave in bodies])

    start = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - start
    print(f"\n32 concurrent streams (8 disconnecting) took {elapsed:.2f} s")

    expected = {p: client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=16, temperature=0,
                                             extra_body=NO_EOS).choices[0].text for p in prompts}
    completed = [(body, r) for (body, _), r in zip(bodies, results) if not r["disconnected"]]
    assert len(completed) == 24 and sum(r["disconnected"] for r in results) == 8
    for body, r in completed:
        assert r["done"] and r["finish"] == "length"
        assert r["text"] == expected[body["prompt"]]

    # The engine forgets the 8 aborted requests: no sequence left, no KV block held.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = (metric(server, "longserve:num_requests_running"), metric(server, "longserve:num_requests_waiting"),
                 metric(server, "longserve:kv_cache_usage_perc"))
        if state == (0, 0, 0):
            break
        time.sleep(0.2)
    assert state == (0, 0, 0), state
    assert metric(server, "longserve:request_aborted_total") - aborted_before == 8


def test_metrics_names_and_counts(server, client):
    before = metric(server, "longserve:generation_tokens_total")
    prompt_before = metric(server, "longserve:prompt_tokens_total")
    length_before = metric(server, "longserve:request_success_total", 'finished_reason="length",')
    r = client.completions.create(model=MODEL_NAME, prompt="count me", max_tokens=5, temperature=0, n=2,
                                  extra_body=NO_EOS)
    assert metric(server, "longserve:generation_tokens_total") - before == 10
    assert metric(server, "longserve:prompt_tokens_total") - prompt_before == r.usage.prompt_tokens
    assert metric(server, "longserve:request_success_total", 'finished_reason="length",') - length_before == 2
    text = httpx.get(server.base + "/metrics").text
    for name in ["longserve:num_requests_running", "longserve:num_requests_waiting", "longserve:kv_cache_usage_perc",
                 "longserve:prefix_cache_queries_total", "longserve:prefix_cache_hits_total",
                 "longserve:time_to_first_token_seconds_bucket", "longserve:inter_token_latency_seconds_bucket",
                 "longserve:e2e_request_latency_seconds_count", "longserve:request_queue_time_seconds_sum"]:
        assert re.search(rf"^{re.escape(name)}{{[^}}]*model_name=\"{MODEL_NAME}\"", text, re.MULTILINE), name
    assert metric(server, "longserve:time_to_first_token_seconds_count") >= 1


# ----------------------------------------------------------------------------------------------------------
# 4. Property-based fuzzing of the request schemas: no 5xx, every error in OpenAI's shape

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
# Values near or past the edges of the numeric ranges, and of the wrong kind.
edge_values = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([-1, 0, 1, 2**63, -(2**63)]),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([-0.0, 1e-300, 1e300]))

text = st.text(min_size=1, max_size=12)
token_ids = st.lists(st.integers(min_value=0, max_value=258), min_size=1, max_size=8)

# Valid values of every field: the fuzzed requests mostly run, so the success paths (streaming, n, stop
# strings, logprobs, seeds, penalties) get exercised, not only the validation.
SAMPLING_FIELDS = {
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=300),
    "min_p": st.floats(min_value=0, max_value=1),
    "n": st.integers(min_value=1, max_value=3),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=258), max_size=3),
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.05, max_value=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(min_value=0, max_value=3),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "user": st.text(max_size=5),
    "model": st.just(MODEL_NAME),
}
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "logprobs": st.integers(min_value=0, max_value=5), "echo": st.booleans()}
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.one_of(st.text(max_size=30), st.lists(text_part, max_size=2))})
CHAT_FIELDS = {**SAMPLING_FIELDS, "max_completion_tokens": st.integers(min_value=1, max_value=6),
               "logprobs": st.booleans(), "top_logprobs": st.integers(min_value=0, max_value=5)}
OTHER_FIELDS = ["logit_bias", "best_of", "suffix", "tools", "tool_choice", "response_format", "stream_options",
                "unknown_field"]


@st.composite
def fuzzed_body(draw, required: dict, optional: dict) -> dict:
    body = draw(st.fixed_dictionaries(required, optional=optional))
    body["stream"] = draw(st.booleans())
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):  # half of the requests: one field gets an edge value or any JSON at all
        key = draw(st.sampled_from(sorted(required) + sorted(optional) + OTHER_FIELDS))
        body[key] = draw(st.one_of(edge_values, json_values))
    return body


completion_bodies = fuzzed_body(
    {"max_tokens": st.integers(min_value=1, max_value=6),
     "prompt": st.one_of(text, st.lists(text, min_size=1, max_size=3), token_ids,
                         st.lists(token_ids, min_size=1, max_size=2))},
    COMPLETION_FIELDS)
chat_bodies = fuzzed_body({"max_tokens": st.integers(min_value=1, max_value=6),
                           "messages": st.lists(message, min_size=1, max_size=3)}, CHAT_FIELDS)


def _check_no_server_error(server, path: str, body) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.stream("POST", server.base + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=60) as r:
        raw = r.read()
    assert r.status_code < 500, (path, body, r.status_code, raw[:500])
    if r.status_code >= 400:
        assert_openai_error(httpx.Response(r.status_code, content=raw), r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = _sse_events(raw.decode().split("\n"))  # not splitlines(): it also splits at U+0085 in text
        assert events and events[-1] == "[DONE]", raw[-300:]
        for event in events[:-1]:
            data = json.loads(event)
            assert "error" not in data, (body, data)
    else:
        data = json.loads(raw)
        assert "choices" in data or "tokens" in data or "prompt" in data, data


FUZZ = settings(max_examples=70, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(server, body):
    _check_no_server_error(server, C, body)


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(server, body):
    _check_no_server_error(server, CHAT, body)


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(path=st.sampled_from([C, CHAT, "/tokenize", "/detokenize"]),
       body=st.one_of(json_values, st.binary(max_size=40),
                      st.dictionaries(st.sampled_from(["prompt", "messages", "tokens", "model", "max_tokens",
                                                       "add_special_tokens"]), json_values, max_size=4)))
def test_fuzz_any_body(server, path, body):
    _check_no_server_error(server, path, body)
    assert httpx.get(server.base + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------------------
# 5. The quickstart of docs/server.md, run as written (only the port differs)


def _quickstart_blocks() -> tuple[str, str]:
    text = (ROOT / "docs" / "server.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    python = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    curl = [b for b in bash if b.lstrip().startswith("curl")]
    assert curl and python, "docs/server.md's Quickstart needs a curl block and a python block"
    return curl[0], python[0]


def test_quickstart_runs_as_written(server):
    curl, python = _quickstart_blocks()
    address = "http://127.0.0.1:8000"
    assert address in curl and address in python
    curl = curl.replace(address, server.base)
    python = python.replace(address, server.base)
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the python quickstart printed nothing"
