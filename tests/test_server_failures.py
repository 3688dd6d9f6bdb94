"""Failures the tiny live model cannot produce on demand, on the app in-process with a stand-in engine: an
engine error half-way through a stream (error event, then the stream closes), an unexpected exception (a 500
or error event with no internals), a stopped engine (/health 503) and a full queue (503)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import pytest

from longserve.engine.errors import EngineError
from longserve.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput
from longserve.server.app import create_app


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from longserve.engine.testing import write_tiny_tokenizer

    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


class StubEngine:
    """Streams 'ab', 'abc', ... then fails with `failure` after `fail_after` snapshots (None: finishes)."""

    def __init__(self, tokenizer, failure: BaseException | None = None, fail_after: int = 1):
        self.tokenizer = tokenizer
        self.model_name = "stub"
        self.max_model_len = 64
        self.config = SimpleNamespace(max_waiting=2, max_num_seqs=2)
        self.dead = None
        self.num_unfinished = 0
        self.failure = failure
        self.fail_after = fail_after

    def stats(self):
        return SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks=8, num_free_blocks=8,
                               prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)

    def validate(self, prompt, params):
        pass

    async def generate(self, prompt, params, request_id, validated=False):
        metrics = RequestMetrics(first_token_time=time.monotonic())
        for step in range(3):
            if self.failure is not None and step == self.fail_after:
                raise self.failure
            await asyncio.sleep(0)
            tokens = [70 + i for i in range(step + 1)]
            done = step == 2
            # Logprobs of -inf (a token suppressed by min_tokens has probability 0).
            lps = [float("-inf")] * len(tokens) if params.logprobs is not None else None
            tops = [[(70, float("-inf"))]] * len(tokens) if params.logprobs is not None else None
            yield RequestOutput(request_id, prompt, [CompletionOutput(0, "x" * (step + 1), tokens,
                                                                      "length" if done else None, None, lps, tops)],
                                done, 0, metrics)


def call(engine, method: str, path: str, body: dict | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, json=body)

    return asyncio.run(go())


def sse_events(response: httpx.Response) -> list:
    return [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]


BODY = {"prompt": "hi", "max_tokens": 3, "stream": True}


def test_stub_engine_streams_to_the_end(tokenizer):
    events = sse_events(call(StubEngine(tokenizer), "POST", "/v1/completions", BODY))
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "xxx"


def test_engine_error_mid_stream_sends_an_error_event_and_closes(tokenizer):
    r = call(StubEngine(tokenizer, EngineError("the engine is shutting down")), "POST", "/v1/completions", BODY)
    assert r.status_code == 200  # the stream had started
    events = sse_events(r)
    assert json.loads(events[0])["choices"][0]["text"] == "x"
    error = json.loads(events[1])["error"]
    assert error["message"] == "the engine is shutting down" and error["type"] == "service_unavailable_error"
    assert events[2:] == ["[DONE]"]


def test_unexpected_error_mid_stream_hides_internals(tokenizer):
    engine = StubEngine(tokenizer, RuntimeError("secret internal detail at 0xdeadbeef"))
    for path, body in (("/v1/completions", BODY),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})):
        events = sse_events(call(engine, "POST", path, body))
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_server_error" and "secret" not in error["message"]
        assert events[-1] == "[DONE]"


def test_unexpected_error_before_the_first_token_is_a_500(tokenizer):
    engine = StubEngine(tokenizer, RuntimeError("secret internal detail"), fail_after=0)
    for stream in (False, True):
        r = call(engine, "POST", "/v1/completions", {**BODY, "stream": stream})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "internal_server_error" and "secret" not in error["message"]


def test_stopped_engine_fails_health(tokenizer):
    engine = StubEngine(tokenizer)
    assert call(engine, "GET", "/health").status_code == 200
    engine.dead = RuntimeError("crashed")
    r = call(engine, "GET", "/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_full_queue_is_a_503(tokenizer):
    engine = StubEngine(tokenizer)
    engine.num_unfinished = 4  # max_waiting + max_num_seqs
    r = call(engine, "POST", "/v1/completions", BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"


def test_zero_probability_logprobs_are_valid_json(tokenizer):
    """JSON has no -Infinity; OpenAI reports -9999.0 for such tokens."""
    r = call(StubEngine(tokenizer), "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 1})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-9999.0] * 3
    r = call(StubEngine(tokenizer), "POST", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1, "stream": True})
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [ch for e in events[:-1] for ch in json.loads(e)["choices"]]
    content = [t for ch in chunks for t in (ch["logprobs"] or {}).get("content", [])]
    assert content and all(t["logprob"] == -9999.0 and t["top_logprobs"][0]["logprob"] == -9999.0 for t in content)
