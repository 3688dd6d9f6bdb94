"""Shared set-up of the vLLM plugin tests (run by `make test-vllm` in .venv-vllm, never by `make test`).

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on the CPU with a 1 GiB KV cache; each engine is
started once per configuration, runs every prompt, and is shut down before the next one starts.
"""

from __future__ import annotations

import gc
import json
import os
import random

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the machine's cores; no pinning

import pytest

from longserve.engine.testing import tiny_checkpoint

MAX_TOKENS = 32
BLOCK_SIZE = 16  # longserve's CPU default; the sparse methods' blocks must match between the two engines
MAX_BATCHED = 64  # tokens per step: every prompt below is prefilled in several chunks

# Small budgets, so 100-200-token prompts are sparse. HyLRA and routing prefill dense ("prefill": "dense": their
# sparse prefill selects per chunk tile, so it depends on how a scheduler cuts prompts, which differs between
# vLLM and longserve); decode tokens are sparse. Superlinear is per query, sparse in prefill too.
METHOD_PARAMS = {
    "superlinear": {"sw_index": 3, "num_spans": 2},
    "hylra": {"topk_tokens": 48, "sink_blocks": 1, "recent_blocks": 1, "prefill_tile": 16, "prefill": "dense"},
    "routing": {"segment_tokens": 64, "tokens_per_cluster": 8, "budget_tokens": 16, "sink_tokens": 4, "window": 8,
                "prefill_tile": 16, "prefill": "dense"},
}
# HyLRA's policy: full, compute, reuse (of layer 1) and compute layers.
HYLRA_LAYERS = [{"mode": "full"}, {"mode": "compute"}, {"mode": "reuse", "source": 1}, {"mode": "compute"}]


def make_prompts() -> list[list[int]]:
    """Four prompts (token ids of the tiny byte-level vocabulary). The third repeats the first one's first 128
    tokens: run after it, its first 8 blocks come from vLLM's prefix cache."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(3, 259) for _ in range(n)]  # noqa: E731
    first = draw(160)
    return [first, draw(90), first[:128] + draw(40), draw(200)]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random-weight Llama and Qwen2 checkpoints with head_dim 64 (vLLM's CPU attention refuses 16)."""
    root = tmp_path_factory.mktemp("ckpt")
    shape = dict(head_dim=64, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    return {arch: str(tiny_checkpoint(root / arch, arch, **shape)) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def hylra_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "hylra.json"
    path.write_text(json.dumps({"format": "longserve-policy/1", "method": "hylra", "params": METHOD_PARAMS["hylra"],
                                "layers": HYLRA_LAYERS}))
    return str(path)


def longserve_section(method: str, policy: str | None = None) -> dict:
    if policy:
        return {"policy": policy}
    return {"attention": method, "attention_config": METHOD_PARAMS.get(method, {})}


_runs: dict[str, dict] = {}


def run_vllm(model: str, prompts: list[list[int]], section: dict | None = None, custom: bool = True,
             **options) -> dict:
    """Greedy tokens of every prompt through vLLM: the first two prompts batched together, then the others
    batched (the third then hits the prefix cache). Returns tokens, cached-token counts and the plugin's state
    per worker. Runs are remembered for the session (an engine start costs seconds)."""
    key = json.dumps([model, prompts, section, custom, options], sort_keys=True)
    if key not in _runs:
        _runs[key] = _run_vllm(model, prompts, section, custom, **options)
    return _runs[key]


def _run_vllm(model: str, prompts: list[list[int]], section: dict | None, custom: bool, **options) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    kwargs = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
                  max_num_batched_tokens=MAX_BATCHED, enable_prefix_caching=True, seed=0, **options)
    if custom:
        kwargs["attention_backend"] = "CUSTOM"
    if section is not None:
        kwargs["additional_config"] = {"longserve": section}
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = []
        for group in (prompts[:2], prompts[2:]):
            outs += llm.generate([{"prompt_token_ids": p} for p in group], params, use_tqdm=False)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                "cached": [o.num_cached_tokens or 0 for o in outs],
                "state": flush_and_inspect(llm)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def flush_and_inspect(llm) -> list[dict]:
    """What the plugin holds in each worker after one more 1-token request: vLLM tells the workers which
    requests finished with the next step, so by then every earlier request's state must be gone."""
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1), use_tqdm=False)
    return llm.apply_model(plugin_state)


def plugin_state(model) -> dict:
    runtimes = {id(m.impl.runtime): m.impl.runtime for m in model.modules()
                if getattr(getattr(m, "impl", None), "runtime", None) is not None}
    routing = [r.backend.methods["routing"] for r in runtimes.values() if "routing" in r.backend.methods]
    impl = next((m.impl for m in model.modules() if getattr(getattr(m, "impl", None), "runtime", None) is not None),
                None)
    return {"heads": (impl.num_heads, impl.num_kv_heads) if impl is not None else None,
            "runtimes": len(runtimes), "sequences": sum(len(r.seq_ids) for r in runtimes.values()),
            "routing_tables": sum(len(b.tracked_sequences()) for b in routing),
            "aux_bytes": sum(r.aux_bytes() for r in runtimes.values())}


def run_longserve(model: str, prompts: list[list[int]], section: dict) -> list[list[int]]:
    """The same prompts through longserve's own engine, same attention, block size and step budget."""
    from longserve.engine.llm import LLM
    from longserve.engine.sampling_params import SamplingParams

    llm = LLM(model=model, device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=256,
              max_num_batched_tokens=MAX_BATCHED, attention=section.get("attention", "dense"),
              attention_config=section.get("attention_config") or {}, policy=section.get("policy"))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]
