"""The `prefill` parameter of the sparse methods: "dense" prompt chunks give exactly dense attention's logits,
decode tokens stay sparse, mixed steps split per sequence, bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch

from longserve.kernels.base import AttentionMetadata, BackendError, LayerCache, StepState
from longserve.kernels.plan import AttentionPlan
from longserve.kernels.registry import build_backend

# Budgets far below the test contexts, so sparse attention differs from dense.
SMALL = {
    "superlinear": {"sw_index": 3, "num_spans": 1, "backward_factor": 0.5, "forward_factor": 0.0},  # W = 15
    "hylra": {"topk_tokens": 16, "sink_blocks": 0, "recent_blocks": 1, "prefill_tile": 8},
    "routing": {"segment_tokens": 32, "tokens_per_cluster": 8, "budget_tokens": 8, "sink_tokens": 1, "window": 4,
                "prefill_tile": 8},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from longserve.engine.loader import load_model
    from longserve.engine.testing import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", num_hidden_layers=3)
    return load_model(str(path), "cpu", torch.float32).model


def _backend(method, prefill, **extra):
    params = {**SMALL[method], "prefill": prefill, **extra}
    plan = AttentionPlan.uniform(method, 3, params)  # every layer sparse (no default dense layers)
    return build_backend(plan=plan, impl="torch")


@pytest.mark.parametrize("method", sorted(SMALL))
def test_dense_prefill_equals_dense_and_decode_stays_sparse(tiny_model, method):
    from longserve.engine.testing import run_sequence

    ids = torch.randint(0, 100, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    dense = run_sequence(tiny_model, ids, build_backend("dense", 3, impl="torch"), block_size=4)
    prompt = run_sequence(tiny_model, ids, _backend(method, "dense"), block_size=4)  # one prompt chunk
    assert torch.equal(prompt, dense)
    chunked = run_sequence(tiny_model, ids, _backend(method, "dense"), block_size=4, chunk=32)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    # one token per step: every token decodes, sparsely
    decoded = run_sequence(tiny_model, ids, _backend(method, "dense"), block_size=4, chunk=1)
    assert (decoded[-20:] - dense[-20:]).abs().max() > 1e-3
    # and sparse prefill is not dense either (in chunks: routing attends its current chunk densely)
    sparse = run_sequence(tiny_model, ids, _backend(method, "sparse"), block_size=4, chunk=32)
    assert (sparse[-20:] - dense[-20:]).abs().max() > 1e-3


def _two_sequence_step(lens_before, query_lens, tables, block_size):
    positions, slots = [], []
    for n0, qn, table in zip(lens_before, query_lens, tables):
        pos = torch.arange(n0, n0 + qn)
        positions.append(pos)
        slots.append(torch.tensor(table)[pos // block_size] * block_size + pos % block_size)
    ctx = [n0 + qn for n0, qn in zip(lens_before, query_lens)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return AttentionMetadata(
        positions=torch.cat(positions), slot_mapping=torch.cat(slots), block_tables=bt,
        context_lens=torch.tensor(ctx, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0).to(torch.int32), block_size=block_size,
        context_lens_cpu=ctx, query_lens_cpu=list(query_lens), seq_ids=[10, 11])


@pytest.mark.parametrize("method,impl", [(m, i) for m in sorted(SMALL) for i in ("torch", "triton")])
def test_mixed_step_splits_prompt_and_decode_sequences(method, impl):
    """A step with a decode token of one sequence and a prompt chunk of another: the decode row equals the
    sparse backend's, the chunk rows equal dense attention's, and the aux tables cover both (the Triton
    paths in the interpreter on CPU)."""
    hq, hkv, d = 4, 2, 16
    bs = 4 if impl == "torch" else 16  # HyLRA's Triton kernels want blocks of 16 keys or more
    nb = 2 * (-(-70 // bs))
    tables = [list(range(0, nb // 2)), list(range(nb // 2, nb))]
    lens = [70, 50]

    def run(prefill_mode, dense=False):
        backend = build_backend("dense", 1, impl=impl) if dense else build_backend(
            plan=AttentionPlan.uniform(method, 1, {**SMALL[method], "prefill": prefill_mode}), impl=impl)
        aux = {n: torch.zeros(nb, *s) for n, (s, _) in backend.aux_specs(hkv, d).items()}
        cache = LayerCache(torch.zeros(nb, hkv, bs, d), torch.zeros(nb, hkv, bs, d), aux)
        gen = torch.Generator().manual_seed(3)
        outs = []
        # step 1: both prompts up to lens - (1, 10); step 2: a decode token of seq 0, a 10-token chunk of seq 1
        for before, qlens in (([0, 0], [lens[0] - 1, lens[1] - 10]), ([lens[0] - 1, lens[1] - 10], [1, 10])):
            meta = _two_sequence_step(before, qlens, tables, bs)
            t = sum(qlens)
            q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
            outs.append(backend.forward(0, q, k, v, cache, meta, StepState()))
        return outs[-1], cache

    mixed, cache = run("dense")
    sparse, sparse_cache = run("sparse")
    dense, _ = run("sparse", dense=True)
    torch.testing.assert_close(mixed[1:], dense[1:], rtol=1e-5, atol=1e-5)  # the prompt chunk: dense
    torch.testing.assert_close(mixed[:1], sparse[:1], rtol=1e-5, atol=1e-5)  # the decode token: sparse
    assert (mixed[:1] - dense[:1]).abs().max() > 1e-4
    for name, table in cache.aux.items():  # per-block tables updated as with sparse prefill
        torch.testing.assert_close(table, sparse_cache.aux[name], rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(SMALL))
def test_bad_prefill_value_is_one_line_error(method):
    with pytest.raises(BackendError, match="prefill must be 'sparse' or 'dense'"):
        build_backend(plan=AttentionPlan.uniform(method, 1, {"prefill": "half"}), impl="torch")
