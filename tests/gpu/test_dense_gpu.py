"""The Triton dense kernels on a real GPU at real shapes (skipped without CUDA: see conftest.py).

Against a float64 reference from the same inputs: float32 far under 1e-3, float16/bfloat16 within their
tolerances (bench/gpu_suite.py TOLERANCE), NaN never passes.
"""

import pytest
import torch

from longserve.bench import gpu_suite
from longserve.bench.gpu_dense import lse_error, make_case, reference_f64
from longserve.bench.gpu_suite import TOLERANCE, relative_error

DEVICE = torch.device("cuda")


def tri():
    from longserve.kernels.triton import dense
    return dense


def run(case, **kw):
    out = torch.full_like(case.q, float("nan"))
    lse = torch.full(case.q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    tri().paged_attention_with_lse(case.q, case.k_cache, case.v_cache, case.meta, out=out, lse=lse, **kw)
    return out, lse


def test_suite_dense_checks_pass_at_full_size():
    ctx = gpu_suite.SuiteContext(DEVICE, quick=False, budget_s=600, seed=11)
    results = [r for r in gpu_suite.run_checks(ctx, only=["dense."], echo=lambda line: None) if not r.skipped]
    failed = [r for r in results if not r.passed]
    assert results and not failed, failed
    assert any(r.name == "dense.cuda_graph" for r in results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_long_context_production_layout(dtype):
    """Two sequences of ~300K tokens, Hq 32 / Hkv 8 / D 128, 64-token blocks: the automatic split count."""
    case = make_case([(300_001, 1), (262_144, 1)], kv_heads=8, group=4, head_dim=128, page=64, dtype=dtype,
                     device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
    out, lse = run(case)
    want, want_lse = reference_f64(case.q, case.k_cache, case.v_cache, case.meta)
    assert relative_error(out, want) <= (1e-5 if dtype == torch.float32 else TOLERANCE[dtype])
    assert lse_error(lse, want_lse) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_chunk_after_long_prefix(dtype):
    """An 8K chunk after a 24K cached prefix and a fresh 3000-token prompt in the same step."""
    case = make_case([(32 * 1024, 8 * 1024), (3000, 3000)], kv_heads=8, group=4, head_dim=128, page=64, dtype=dtype,
                     device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    out, lse = run(case)
    want, want_lse = reference_f64(case.q, case.k_cache, case.v_cache, case.meta)
    assert relative_error(out, want) <= (1e-5 if dtype == torch.float32 else TOLERANCE[dtype])
    assert lse_error(lse, want_lse) <= 1e-4


def test_decode_never_synchronises_with_the_host():
    """CUDA-graph capturable: no .item()/.tolist()/.cpu() on the decode path."""
    case = make_case([(5000, 1)] * 4, kv_heads=8, group=4, head_dim=128, page=64, dtype=torch.bfloat16,
                     device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3))
    out = torch.empty_like(case.q)
    tri().paged_attention(case.q, case.k_cache, case.v_cache, case.meta, out=out)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tri().paged_attention(case.q, case.k_cache, case.v_cache, case.meta, out=out)
        tri().write_kv(case.k_cache, case.v_cache, case.q[:, :8], case.q[:, 8:16], case.meta.slot_mapping)
    finally:
        torch.cuda.set_sync_debug_mode("default")
