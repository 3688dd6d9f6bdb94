"""A failing step fails only its own requests; an engine thread that dies anyway fails what is in flight and
makes `longserve serve` exit non-zero (so a supervisor restarts it). Faults are injected into the model runner."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx
import pytest

from longserve.engine import LLM, EngineError, SamplingParams
from longserve.engine.async_engine import MAX_FAILED_STEPS_IN_A_ROW, AsyncEngine
from longserve.engine.config import EngineConfig
from longserve.engine.errors import StepError
from longserve.engine.testing import tiny_checkpoint

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
POISON = 250  # a prompt starting with this token makes the injected fault fire


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def inject_fault(engine, fires=lambda scheduled: True):
    """The runner raises whenever `fires(scheduled)` is true for a step."""
    execute = engine.runner.execute

    def faulty(scheduled):
        if fires(scheduled):
            raise RuntimeError("injected fault")
        return execute(scheduled)

    engine.runner.execute = faulty


def poisoned(scheduled) -> bool:
    return any(item.seq.request.prompt_token_ids[0] == POISON for item in scheduled)


def test_a_failing_step_aborts_its_requests_and_the_engine_goes_on(ckpt):
    llm = LLM(model=str(ckpt), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    inject_fault(engine, poisoned)
    bad = engine.add_request([POISON, 5, 6, 7, 8, 9], PARAMS)
    with pytest.raises(StepError, match="injected fault") as e:
        engine.step()
    assert e.value.request_ids == [bad]
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    out = llm.generate([[3, 4, 5, 6, 7]], PARAMS)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4


async def _collect(engine: AsyncEngine, prompt: list[int]) -> list:
    return [out async for out in engine.generate(prompt, PARAMS)]


def test_async_engine_survives_a_failed_step_and_stops_after_repeated_ones(ckpt):
    config = EngineConfig(model=str(ckpt), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    engine = AsyncEngine(config)
    died = threading.Event()
    engine.on_death(died.set)
    try:
        inject_fault(engine.engine, poisoned)
        with pytest.raises(EngineError, match="internal engine error"):
            asyncio.run(_collect(engine, [POISON, 1, 2, 3]))
        outs = asyncio.run(_collect(engine, [3, 4, 5, 6]))  # the engine thread still serves
        assert outs[-1].finished and engine.dead is None and not died.is_set()

        inject_fault(engine.engine)  # now every step fails: the engine is broken
        for _ in range(MAX_FAILED_STEPS_IN_A_ROW):
            with pytest.raises(EngineError, match="internal engine error"):
                asyncio.run(_collect(engine, [3, 4, 5, 6]))
        assert died.wait(10) and isinstance(engine.dead, StepError)
        with pytest.raises(EngineError, match="the engine has stopped"):
            asyncio.run(_collect(engine, [3, 4, 5, 6]))
        called = threading.Event()
        engine.on_death(called.set)  # registered after the death: called at once
        assert called.is_set()
    finally:
        engine.shutdown()


# `longserve serve` whose model runner fails every step after the first `ok_steps`.
FAULTY_SERVER = """
import sys
from longserve.engine import async_engine

class FaultyEngine(async_engine.AsyncEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        execute, calls = self.engine.runner.execute, [0]

        def faulty(scheduled):
            calls[0] += 1
            if calls[0] > {ok_steps}:
                raise RuntimeError("injected fault")
            return execute(scheduled)

        self.engine.runner.execute = faulty

async_engine.AsyncEngine = FaultyEngine
from longserve.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_server_exits_non_zero_when_the_engine_thread_dies(ckpt, tmp_path):
    from test_server import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", FAULTY_SERVER.format(ok_steps=3), "serve", "--model", str(ckpt),
                                 "--device", "cpu", "--dtype", "float32", "--port", str(port), "--block-size", "4",
                                 "--num-kv-blocks", "256", "--served-model-name", "m"], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base, log_path)
            body = {"model": "m", "prompt": "hello", "max_tokens": 50, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-3:]
            assert any("error" in json.loads(e) for e in events if e != "[DONE]"), events[-3:]
            for _ in range(MAX_FAILED_STEPS_IN_A_ROW - 1):
                r = httpx.post(base + "/v1/completions", json={**body, "stream": False}, timeout=60)
                assert r.status_code == 503 and "error" in r.json(), r.text
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert code == 1, text[-3000:]
    assert "longserve serve: error: the engine stopped" in text, text[-3000:]


def _wait_healthy(proc, base: str, log_path, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not healthy:\n{log_path.read_text()[-3000:]}")
