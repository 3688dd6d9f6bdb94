"""Server behaviour around requests: the API key, the capacity bound (503), a non-streaming client that
leaves, and SIGTERM with requests in flight (the short one finishes, the long one is failed, exit 0).

One `longserve serve` process with an API key (from LONGSERVE_API_KEY), room for 2 running + 2 waiting
requests and a 2 s shutdown grace; the SIGTERM test runs last and stops it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from test_server import ServerProcess, assert_openai_error

KEY = "test-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRACE_S = 2.0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from longserve.engine.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("lifecycle-model") / "llama", arch="llama")


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("lifecycle-log") / "server.log",
                         "--max-model-len", "8192", "--block-size", "16", "--num-kv-blocks", "1024",
                         "--max-num-seqs", "2", "--max-waiting", "2", "--shutdown-timeout", str(GRACE_S),
                         env={"LONGSERVE_API_KEY": KEY})
    proc.wait_healthy()
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log_path.read_text(), proc.log_tail(20000)


def metric(server, name: str) -> float:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def idle(server) -> bool:
    return (metric(server, "longserve:num_requests_running"), metric(server, "longserve:num_requests_waiting"),
            metric(server, "longserve:kv_cache_usage_perc")) == (0, 0, 0)


LONG = {"prompt": "hi", "max_tokens": 6000, "temperature": 0, "ignore_eos": True}


def test_api_key(keyed_server):
    base = keyed_server.base
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        error = assert_openai_error(httpx.post(base + "/v1/completions", json=body, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(httpx.get(base + "/v1/models", headers=headers), 401)
        assert_openai_error(httpx.post(base + "/tokenize", json={"prompt": "x"}, headers=headers), 401)
    assert httpx.post(base + "/v1/completions", json=body, headers=AUTH).status_code == 200
    for open_route in ("/health", "/metrics", "/version"):
        assert httpx.get(base + open_route).status_code == 200, open_route
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=good.models.list().data[0].id, prompt="hi", max_tokens=3).choices


def test_capacity_bound_answers_503(keyed_server):
    """2 running + 2 waiting fill the server; the 5th request gets 503 until they leave."""
    base = keyed_server.base

    async def scenario():
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as http:
            async def hold():
                async with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(4)]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = await http.get("/metrics")
                running = waiting = 0
                for line in r.text.splitlines():
                    if line.startswith("longserve:num_requests_running{"):
                        running = float(line.rsplit(" ", 1)[1])
                    if line.startswith("longserve:num_requests_waiting{"):
                        waiting = float(line.rsplit(" ", 1)[1])
                if (running, waiting) == (2, 2):
                    break
                await asyncio.sleep(0.05)
            assert (running, waiting) == (2, 2)
            refused = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            refused_stream = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
            for holder in holders:  # the four clients leave, running or waiting
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return refused, refused_stream

    refused, refused_stream = asyncio.run(scenario())
    for r in (refused, refused_stream):
        assert assert_openai_error(r, 503)["code"] == "server_overloaded"
    wait_for(lambda: idle(keyed_server), what="the aborted requests to free their blocks")
    r = httpx.post(keyed_server.base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200


def test_non_streaming_disconnect_aborts(keyed_server):
    aborted = metric(keyed_server, "longserve:request_aborted_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(keyed_server.base + "/v1/completions", json=LONG, headers=AUTH,
                   timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: metric(keyed_server, "longserve:request_aborted_total") == aborted + 1, what="the abort")
    wait_for(lambda: idle(keyed_server), what="the KV blocks to be freed")


def _stream_in_thread(server, body: dict, events: list, first_event: threading.Event) -> threading.Thread:
    def run():
        try:
            with httpx.stream("POST", server.base + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        first_event.set()
        except httpx.HTTPError as e:
            events.append(f"transport error: {e!r}")
        first_event.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_finishes_short_requests_fails_long_ones_and_exits(keyed_server):
    short_events: list[str] = []
    long_events: list[str] = []
    short_started, long_started = threading.Event(), threading.Event()
    long_thread = _stream_in_thread(keyed_server, LONG, long_events, long_started)
    short_thread = _stream_in_thread(keyed_server, {**LONG, "max_tokens": 300}, short_events, short_started)
    assert long_started.wait(30) and short_started.wait(30)

    sent = time.monotonic()
    keyed_server.proc.send_signal(signal.SIGTERM)
    code = keyed_server.proc.wait(timeout=GRACE_S + 20)
    took = time.monotonic() - sent
    long_thread.join(10)
    short_thread.join(10)
    assert code == 0, keyed_server.log_tail()
    assert took < GRACE_S + 10, took

    # The short request finished normally during the grace period.
    assert short_events[-1] == "[DONE]", short_events[-3:]
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    # The long one (6000 tokens) could not: it got an error event, then [DONE], instead of a cut connection.
    assert long_events[-1] == "[DONE]", long_events[-3:]
    error = json.loads(long_events[-2])["error"]
    assert "shutting down" in error["message"] and error["code"]
    # And the port is closed.
    with pytest.raises(httpx.ConnectError):
        httpx.get(keyed_server.base + "/health", timeout=2)
