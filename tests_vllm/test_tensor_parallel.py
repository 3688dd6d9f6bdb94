"""Tensor parallelism 2 on the CPU: each rank attends its own heads (2 of the 4 query heads, 1 of the 2 KV
heads) with its own aux tables; the tokens equal tensor parallelism 1's and longserve's engine's."""

from __future__ import annotations

import pytest

from conftest import BLOCK_SIZE, longserve_section, make_prompts, run_longserve, run_vllm

pytestmark = pytest.mark.slow


def test_tp2_equals_tp1(checkpoints, hylra_policy):
    prompts = make_prompts()
    section = longserve_section("hylra", hylra_policy)  # full, compute and reuse layers
    one = run_vllm(checkpoints["llama"], prompts, section, block_size=BLOCK_SIZE)
    two = run_vllm(checkpoints["llama"], prompts, section, block_size=BLOCK_SIZE, tensor_parallel_size=2)
    assert [s["heads"] for s in one["state"]] == [(4, 2)]
    assert [s["heads"] for s in two["state"]] == [(2, 1), (2, 1)]
    assert two["cached"][2] >= 128
    assert two["tokens"] == one["tokens"] == run_longserve(checkpoints["llama"], prompts, section)
