"""The OpenAPI document against the live server: schemathesis (every check) finds no request the server answers
against its own contract, and the document states the contract's parts that clients rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_server import serve_module

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from longserve.engine.testing import tiny_checkpoint

    model = tiny_checkpoint(tmp_path_factory.mktemp("openapi-model") / "llama", arch="llama")
    yield from serve_module(model, tmp_path_factory.mktemp("openapi-log"), "--max-model-len", "4096",
                            "--block-size", "16", "--num-kv-blocks", "4096", "--max-num-seqs", "16")


def test_document_states_the_contract(server):
    doc = httpx.get(server.base + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat["responses"])
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    token_ids = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert token_ids["minimum"] == 0 and token_ids["maximum"] == 258  # the tiny model's vocabulary
    assert schemas["CompletionRequest"]["properties"]["n"]["maximum"] == 128
    wrong_method = httpx.put(server.base + "/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


@pytest.mark.slow
def test_schemathesis_finds_no_contract_failure(server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.base + "/openapi.json", "--checks", "all",
           "--max-examples", os.environ.get("LONGSERVE_SCHEMATHESIS_EXAMPLES", "12"), "--seed", "1",
           "--generation-deterministic", "--request-timeout", "60", "--max-failures", "20", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": HOOKS.stem,
                              "PYTHONPATH": f"{HOOKS.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert "No issues found" in out.stdout or "passed" in out.stdout, report
    assert httpx.get(server.base + "/health").status_code == 200
