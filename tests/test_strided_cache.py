"""The sparse methods' CPU reference paths read K and V caches that are strided views of one tensor (vLLM's
layer cache [blocks, Hkv, block_size, 2 * D], see vllm_plugin/adapter.py) exactly as the engine's contiguous
caches: same steps, same outputs."""

from __future__ import annotations

import pytest
import torch

from longserve.kernels.base import AttentionMetadata, LayerCache, StepState
from longserve.kernels.plan import AttentionPlan
from longserve.kernels.registry import build_backend

PARAMS = {
    "superlinear": {"sw_index": 3, "num_spans": 2, "prefill": "sparse"},
    "hylra": {"topk_tokens": 32, "sink_blocks": 1, "recent_blocks": 1, "prefill": "sparse"},
    "routing": {"segment_tokens": 32, "tokens_per_cluster": 8, "budget_tokens": 16, "window": 16, "sink_tokens": 4,
                "prefill_tile": 16, "prefill": "sparse"},
}


def run_steps(method: str, strided: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, blocks = 4, 2, 8, 8, 40
    lens = [150, 70]
    backend = build_backend(plan=AttentionPlan.uniform(method, 1, PARAMS[method]), impl="torch")
    kv = torch.randn(blocks, hkv, bs, 2 * d, generator=gen, dtype=torch.float64)  # garbage of earlier steps
    if strided:
        pages = kv.view(blocks, hkv, 2 * bs, d)
        k_cache, v_cache = pages[:, :, :bs], pages[:, :, bs:]
        assert not k_cache.is_contiguous()
    else:
        pages = kv.clone().view(blocks, hkv, 2 * bs, d)
        k_cache, v_cache = pages[:, :, :bs].contiguous(), pages[:, :, bs:].contiguous()
    aux = {name: torch.zeros((blocks, *shape), dtype=dt or torch.float64)
           for name, (shape, dt) in backend.aux_specs(hkv, d).items()}
    cache = LayerCache(k_cache, v_cache, aux)
    tables = [list(range(0, 19)), list(range(19, 29))]
    outs = []
    for done, new in [((0, 0), (lens[0] - 2, lens[1] - 2)), ((lens[0] - 2, lens[1] - 2), (1, 1)),
                      ((lens[0] - 1, lens[1] - 1), (1, 1))]:
        meta = AttentionMetadata.for_step(tables, [a + b for a, b in zip(done, new)], list(new), bs)
        t = sum(new)
        q = torch.randn(t, hq, d, generator=gen, dtype=torch.float64)
        k = torch.randn(t, hkv, d, generator=gen, dtype=torch.float64)
        v = torch.randn(t, hkv, d, generator=gen, dtype=torch.float64)
        outs.append(backend.forward(0, q, k, v, cache, meta, StepState()))
    return outs


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_strided_kv_views_give_the_contiguous_cache_outputs(method):
    for got, want in zip(run_steps(method, strided=True), run_steps(method, strided=False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
