"""Greedy tokens through vLLM with the plugin: dense equals vLLM's own CPU attention; superlinear, HyLRA (a
policy with full, compute and reuse layers) and routing equal longserve's own engine. Every run batches
prompts, prefills them in chunks (64-token steps) and hits the prefix cache."""

from __future__ import annotations

import pytest

from conftest import BLOCK_SIZE, longserve_section, make_prompts, run_longserve, run_vllm

pytestmark = pytest.mark.slow
PROMPTS = make_prompts()


def _check_run_shape(run: dict) -> None:
    assert all(len(t) == 32 for t in run["tokens"])
    assert run["cached"][2] >= 128  # the third prompt's shared prefix came from the cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_plugin_equals_vllm_cpu_attention(checkpoints, arch):
    own = run_vllm(checkpoints[arch], PROMPTS, custom=False)
    plugin = run_vllm(checkpoints[arch], PROMPTS)  # no longserve section: dense
    _check_run_shape(plugin)
    assert plugin["tokens"] == own["tokens"]
    # The CUSTOM run went through longserve's backend (vLLM's CPU platform would have chosen its own).
    assert [s["runtimes"] for s in plugin["state"]] == [1] and [s["runtimes"] for s in own["state"]] == [0]


@pytest.fixture(scope="module")
def dense_longserve(checkpoints):
    return {arch: run_longserve(path, PROMPTS, {"attention": "dense"}) for arch, path in checkpoints.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["superlinear", "hylra", "routing"])
def test_sparse_methods_equal_longserve_engine(checkpoints, hylra_policy, dense_longserve, arch, method):
    section = longserve_section(method, hylra_policy if method == "hylra" else None)
    expected = run_longserve(checkpoints[arch], PROMPTS, section)
    got = run_vllm(checkpoints[arch], PROMPTS, section, block_size=BLOCK_SIZE)
    _check_run_shape(got)
    assert got["tokens"] == expected
    # The budgets are small enough that the method attends sparsely: its tokens differ from dense attention's.
    assert expected != dense_longserve[arch]
    # One runtime per worker; only the last (1-token) request still has state: every earlier one was freed.
    [state] = got["state"]
    assert state["runtimes"] == 1 and state["sequences"] == 1
    assert state["routing_tables"] <= 1  # the earlier requests' cluster tables are gone
    if method != "routing":  # per-block summaries beside vLLM's cache (routing keeps per-sequence tables)
        assert state["aux_bytes"] > 0
