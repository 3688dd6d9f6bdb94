"""The Triton dense kernels (kernels/triton/dense.py) against the PyTorch reference and a float64 oracle.

Without CUDA they run in Triton's interpreter (float32 and float16: bfloat16 is wrong there). Every output
is poisoned with NaN before the run, every cache slot past a context holds NaN, the split-KV workspace is
poisoned too, so an unwritten element or a read past the context shows up as NaN.
"""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton: it decides at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from longserve.bench import gpu_dense, gpu_suite  # noqa: E402
from longserve.bench.gpu_dense import lse_error, make_case, reference_f64  # noqa: E402
from longserve.bench.gpu_suite import relative_error  # noqa: E402
from longserve.kernels.base import LayerCache, StepState  # noqa: E402
from longserve.kernels.dense import DenseBackend  # noqa: E402
from longserve.kernels.reference import dense as ref  # noqa: E402
from longserve.kernels.triton import dense as tri  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# (kv_heads, group, head_dim, block_size): GQA ratios 1, 4, 8; head dims 64 and 128; small and large blocks
LAYOUTS = [(2, 1, 64, 16), (1, 4, 128, 32), (1, 8, 64, 16), (2, 4, 64, 64)]


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    monkeypatch.setattr(tri, "POISON_WORKSPACE", True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def run(case, **kw):
    out = torch.full_like(case.q, float("nan"))
    lse = torch.full(case.q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    tri.paged_attention_with_lse(case.q, case.k_cache, case.v_cache, case.meta, out=out, lse=lse, **kw)
    return out, lse


def assert_matches(case, out, lse, dtype, scale=None):
    """Against the float64 oracle (tight) and the project's PyTorch reference (what the CPU path runs)."""
    want, want_lse = reference_f64(case.q, case.k_cache, case.v_cache, case.meta, scale)
    err = relative_error(out, want)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"
    assert lse_error(lse, want_lse) <= 1e-5
    torch_path = ref.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale)
    assert relative_error(out, torch_path) <= TOL[dtype]


# ---------------------------------------------------------------------------------------- cache write

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads,head_dim,page", [(2, 64, 16), (3, 128, 32)])
def test_write_kv_scatters_and_skips_negative_slots(dtype, kv_heads, head_dim, page):
    g = gen(1)
    blocks, tokens = 6, 41
    slots = torch.randperm(blocks * page, generator=g, device=DEVICE)[:tokens]
    slots[::5] = -1  # padded rows
    # k as a strided view (a slice of a fused qkv projection), v contiguous
    qkv = torch.randn(tokens, 3 * kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
    k, v = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:].contiguous()
    k_cache = torch.full((blocks, kv_heads, page, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    tri.write_kv(k_cache, v_cache, k, v, slots)

    want_k = torch.full_like(k_cache, float("nan"))
    want_v = torch.full_like(v_cache, float("nan"))
    keep = slots >= 0
    ref.write_kv(want_k, want_v, k[keep], v[keep], slots[keep])
    assert torch.equal(torch.isnan(k_cache), torch.isnan(want_k))  # exactly the kept slots written
    assert torch.equal(torch.nan_to_num(k_cache), torch.nan_to_num(want_k))
    assert torch.equal(torch.nan_to_num(v_cache), torch.nan_to_num(want_v))
    assert int(torch.isnan(k_cache).sum()) == (blocks * page - int(keep.sum())) * kv_heads * head_dim


def test_write_kv_converts_to_the_cache_dtype():
    k = torch.randn(5, 2, 32, device=DEVICE)
    k_cache = torch.zeros(2, 2, 16, 32, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    tri.write_kv(k_cache, v_cache, k, -k, torch.tensor([0, 3, 17, 30, 31], device=DEVICE))
    assert torch.equal(k_cache[1, :, 14], k[3].half())
    assert torch.equal(v_cache[0, :, 3], -k[1].half())


# ---------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"Hkv{l[0]}-G{l[1]}-D{l[2]}-bs{l[3]}")
def test_decode_matches_reference(dtype, layout):
    kv_heads, group, head_dim, page = layout
    # odd lengths and block boundaries: 1, page-1, page, page+1, a few blocks and change
    contexts = [1, page - 1, page, page + 1, 3 * page + 5]
    for seed, splits in enumerate([None, 1, 3]):
        case = make_case([(c, 1) for c in contexts], kv_heads=kv_heads, group=group, head_dim=head_dim, page=page,
                         dtype=dtype, device=DEVICE, generator=gen(seed))
        out, lse = run(case, num_splits=splits)
        assert_matches(case, out, lse, dtype)


def test_decode_more_splits_than_keys():
    """Most of the 12 splits of these contexts have no key at all: they must merge in as nothing."""
    case = make_case([(1, 1), (17, 1), (40, 1)], kv_heads=1, group=4, head_dim=64, page=16, dtype=torch.float16,
                     device=DEVICE, generator=gen(4))
    out, lse = run(case, num_splits=12)
    assert_matches(case, out, lse, torch.float16)


def test_decode_vector_block_path_in_float32():
    """Tiles wider than a block look each key's block up separately (the float32 default tiles fit in a
    block, so force a wide tile)."""
    cfg = replace(tri.default_config(64, torch.float32), decode_block_n=64, prefill_block_n=32)
    case = make_case([(37, 1), (16, 1), (70, 40)], kv_heads=1, group=4, head_dim=64, page=16, dtype=torch.float32,
                     device=DEVICE, generator=gen(5))
    out, lse = run(case, num_splits=2, config=cfg)
    assert_matches(case, out, lse, torch.float32)


def test_decode_head_dim_256_and_block_128():
    case = make_case([(130, 1), (255, 1)], kv_heads=1, group=2, head_dim=256, page=128, dtype=torch.float16,
                     device=DEVICE, generator=gen(6))
    out, lse = run(case, num_splits=2)
    assert_matches(case, out, lse, torch.float16)


def test_padded_rows_give_zeros_and_minus_inf():
    """Padding rows of a CUDA-graph bucket (context 0) must not produce NaN."""
    case = make_case([(20, 1), (0, 1), (5, 1)], kv_heads=1, group=4, head_dim=64, page=16, dtype=torch.float16,
                     device=DEVICE, generator=gen(7))
    for splits in (1, 4):
        out, lse = run(case, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert bool(torch.isneginf(lse[1]).all())
        assert_matches(case, out, lse, torch.float16)


def test_partial_results_merge_exactly_by_lse():
    """Attention over keys [0, a) and over [a, n) merged by their log-sum-exps equals attention over all n:
    the contract sparse backends rely on to combine pieces."""
    page, n, a = 16, 80, 48
    case = make_case([(n, 1)], kv_heads=2, group=4, head_dim=64, page=page, dtype=torch.float32, device=DEVICE,
                     generator=gen(8))
    full_out, full_lse = run(case)
    table = case.meta.block_tables
    first = replace(case.meta, context_lens=torch.tensor([a], dtype=torch.int32, device=DEVICE),
                    context_lens_cpu=[a])
    second = replace(case.meta, block_tables=table[:, a // page:].contiguous(),
                     context_lens=torch.tensor([n - a], dtype=torch.int32, device=DEVICE), context_lens_cpu=[n - a],
                     positions=case.meta.positions - a)
    o1, l1 = tri.paged_attention_with_lse(case.q, case.k_cache, case.v_cache, first)
    o2, l2 = tri.paged_attention_with_lse(case.q, case.k_cache, case.v_cache, second)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2
    assert relative_error(merged, full_out) < 1e-5
    assert relative_error(lse, full_lse) < 1e-6


# --------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"Hkv{l[0]}-G{l[1]}-D{l[2]}-bs{l[3]}")
def test_prefill_matches_reference(dtype, layout):
    kv_heads, group, head_dim, page = layout
    # a fresh odd-length prompt, a block-aligned chunk after a cached prefix, an odd chunk after an odd prefix,
    # a 2-token chunk (the smallest the prefill kernel takes)
    seqs = [(37, 37), (3 * page, page), (2 * page + 5, 19), (page + 2, 2)]
    case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                     device=DEVICE, generator=gen(11))
    out, lse = run(case)
    assert_matches(case, out, lse, dtype)


def test_prefill_several_query_tiles_and_custom_scale():
    cfg = replace(tri.default_config(64, torch.float16), prefill_rows=16, prefill_block_n=16)  # 4 tokens a tile
    case = make_case([(50, 23), (9, 9)], kv_heads=2, group=4, head_dim=64, page=16, dtype=torch.float16,
                     device=DEVICE, generator=gen(12))
    out = torch.full_like(case.q, float("nan"))
    lse = torch.full(case.q.shape[:2], float("nan"), device=DEVICE)
    tri.paged_attention_with_lse(case.q, case.k_cache, case.v_cache, case.meta, 0.2, out=out, lse=lse, config=cfg)
    assert_matches(case, out, lse, torch.float16, scale=0.2)


# ----------------------------------------------------------------------------------------- mixed batch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS[1:3], ids=lambda l: f"G{l[1]}-D{l[2]}")
def test_mixed_prefill_and_decode_in_one_step(dtype, layout):
    kv_heads, group, head_dim, page = layout
    seqs = [(page + 3, 1), (2 * page, 2 * page), (5, 0), (3 * page + 1, page + 1), (page, 1), (1, 1)]
    case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                     device=DEVICE, generator=gen(13))
    out, lse = run(case, num_splits=2)
    assert_matches(case, out, lse, dtype)


# ------------------------------------------------------------------------------------ API and backend

def test_dense_backend_triton_equals_torch():
    kv_heads, group, head_dim, page = 2, 4, 64, 16
    seqs = [(40, 40), (17, 1), (33, 9)]
    results = {}
    for impl in ("torch", "triton"):
        case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=torch.float32,
                         device=DEVICE, generator=gen(14))
        # the step's new K/V go in through the backend: take them out of the cache first
        meta = case.meta
        pos = meta.positions
        starts = meta.query_start_loc.tolist()
        rows = torch.cat([torch.full((starts[i + 1] - starts[i],), i) for i in range(len(seqs))]).to(DEVICE)
        blocks = meta.block_tables[rows, pos // page].long()
        slots = blocks * page + pos % page
        k_new = case.k_cache[blocks, :, pos % page].clone()
        v_new = case.v_cache[blocks, :, pos % page].clone()
        case.k_cache[blocks, :, pos % page] = float("nan")
        case.v_cache[blocks, :, pos % page] = float("nan")
        meta = replace(meta, slot_mapping=slots)
        cache = LayerCache(case.k_cache, case.v_cache)
        out = DenseBackend(impl).forward(0, case.q, k_new, v_new, cache, meta, StepState())
        results[impl] = (out, cache.k.clone(), cache.v.clone())
    (o_t, k_t, v_t), (o_x, k_x, v_x) = results["torch"], results["triton"]
    assert relative_error(o_x, o_t) < 1e-5
    assert torch.equal(torch.nan_to_num(k_x), torch.nan_to_num(k_t)) and torch.equal(k_x.isnan(), k_t.isnan())
    assert torch.equal(torch.nan_to_num(v_x), torch.nan_to_num(v_t))


def test_decode_num_splits_fills_the_device_within_limits():
    cpu = torch.device("cpu")
    assert tri.decode_num_splits(1, 8, 0, cpu) == 1
    assert tri.decode_num_splits(0, 8, 100, cpu) == 1
    assert tri.decode_num_splits(1, 1, 100, cpu) == 1  # shorter than one split's minimum
    many = tri.decode_num_splits(1, 1, 10_000_000, cpu)
    assert 1 < many <= 256
    assert tri.decode_num_splits(64, 8, 10_000_000, cpu) == 1  # enough programs already


@pytest.mark.parametrize("mutate,message", [
    (lambda c: dict(q=c.q.to(torch.float16)), "share a dtype"),
    (lambda c: dict(q=c.q[:, :3]), "multiple of kv heads"),
    (lambda c: dict(q=c.q[..., :32]), "head_dim"),
    (lambda c: dict(meta=replace(c.meta, query_lens_cpu=[])), "query_lens_cpu"),
    (lambda c: dict(meta=replace(c.meta, positions=c.meta.positions[:1])), "positions"),
    (lambda c: dict(k_cache=c.k_cache[:, :, :, :1]), "head_dim"),
])
def test_bad_inputs_raise_one_line_errors(mutate, message):
    case = make_case([(20, 2)], kv_heads=2, group=2, head_dim=64, page=16, dtype=torch.float32, device=DEVICE,
                     generator=gen(15))
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, meta=case.meta)
    args.update(mutate(case))
    with pytest.raises(ValueError, match=message) as info:
        tri.paged_attention(args["q"], args["k_cache"], args["v_cache"], args["meta"])
    assert "\n" not in str(info.value)


def test_write_kv_bad_inputs():
    k = torch.zeros(4, 2, 32, device=DEVICE)
    cache = torch.zeros(2, 2, 16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        tri.write_kv(cache, cache.clone(), k, k, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        tri.write_kv(cache, cache.clone(), k[:, :1], k[:, :1], torch.zeros(4, dtype=torch.int64, device=DEVICE))


# ------------------------------------------------------------------------------------------- the suite

@pytest.mark.slow
def test_gpu_suite_dense_checks_pass_at_tiny_shapes():
    ctx = gpu_suite.SuiteContext(DEVICE, quick=True, budget_s=600, seed=3, tiny=True)
    results = gpu_suite.run_checks(ctx, only=["dense."], echo=lambda line: None)
    ran = [r for r in results if not r.skipped]
    assert len(ran) >= 40
    assert all(r.passed for r in ran), [r for r in ran if not r.passed]
    names = {r.name for r in ran}
    assert {"dense.write_kv", "dense.decode", "dense.prefill", "dense.mixed", "dense.padded_batch"} <= names


def test_gpu_suite_cli_writes_json_and_fails_on_a_failed_check(tmp_path, monkeypatch, capsys):
    path = tmp_path / "out.json"
    assert gpu_suite.main(["--only", "dense.write_kv", "--json", str(path), "--seed", "4"]) == 0
    data = json.loads(path.read_text())
    assert data["checks"] and all(c["passed"] for c in data["checks"])
    assert data["timings"] and data["timings"][0]["name"] == "dense.write_kv" and data["timings"][0]["ms"] > 0
    assert "checks:" in capsys.readouterr().out

    def broken(ctx):
        yield gpu_suite.CheckResult("zz.broken", "case", float("nan"), 1e-3, False)
    monkeypatch.setattr(gpu_suite, "CHECKS", gpu_suite.CHECKS + [gpu_suite._Entry("zz.broken", broken, 999)])
    assert gpu_suite.main(["--only", "zz.broken", "--checks-only"]) == 1


def test_relative_error_never_passes_nan():
    ref_t = torch.ones(4)
    assert relative_error(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref_t) != relative_error(ref_t, ref_t)
    ctx = gpu_suite.SuiteContext(torch.device("cpu"), quick=True, budget_s=1)
    assert not ctx.compare("x", "y", torch.tensor([float("nan")] * 4), ref_t, torch.float32).passed
    assert ctx.compare("x", "y", ref_t * (1 + 1e-6), ref_t, torch.float32).passed


def test_suite_timing_rows_smoke():
    ctx = gpu_suite.SuiteContext(DEVICE, quick=True, budget_s=600, seed=5, tiny=True)
    rows = list(gpu_dense.time_decode(ctx))
    assert len(rows) == 2 and all(r.ms and r.ms > 0 and r.baseline_ms for r in rows)
    assert all(r.extra["err_vs_sdpa"] < 1e-2 for r in rows)  # the paged kernel computed SDPA's answer


def test_engine_greedy_output_triton_equals_torch(tmp_path, monkeypatch):
    """The whole engine on a tiny model: chunked prefill mixed with decode steps, Triton path vs PyTorch."""
    from longserve.engine import LLM, SamplingParams
    from longserve.engine.testing import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "llama", arch="llama")  # head_dim 16, 4 query heads over 2 KV heads
    prompts = [[(5 * i + 3 * j) % 200 + 1 for j in range(n)] for i, n in enumerate([21, 3, 40])]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    calls = []
    original = tri.paged_attention_with_lse
    monkeypatch.setattr(tri, "paged_attention_with_lse",
                        lambda *a, **kw: calls.append(a[3].query_lens_cpu) or original(*a, **kw))
    outputs = {}
    for impl in ("torch", "triton"):
        llm = LLM(model=str(ckpt), device=str(DEVICE), dtype="float32", block_size=16, num_kv_blocks=64,
                  max_num_batched_tokens=16, attention_impl=impl)
        outputs[impl] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert outputs["triton"] == outputs["torch"]
    assert all(len(t) == 6 for t in outputs["torch"])
    assert any(1 in lens and max(lens) > 1 for lens in calls), "no mixed prefill/decode step ran through Triton"


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """Compiled for sm_90 with Triton's bundled ptxas (no GPU needed): no register spills, Hopper's warpgroup
    MMA in the prefill kernel, asynchronous 16-byte copies feeding the decode kernel. Runs in a subprocess
    because this module's kernels were decorated for the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "longserve.bench.kernel_report", "--only", "dense"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("_")]
    assert {line.split()[0] for line in lines} == {"_decode_kernel", "_merge_kernel", "_prefill_kernel",
                                                   "_write_kv_kernel"}
    assert all(" stack=0 " in line for line in lines), proc.stdout
    assert all("HGMMA" in line for line in lines if line.startswith("_prefill_kernel")), proc.stdout
    assert all("LDGSTS" in line for line in lines if line.startswith("_decode_kernel")), proc.stdout


def test_split_count_uses_measured_residency():
    # Hopper: 64K registers, 228 KB shared memory per multiprocessor
    assert tri.residency(regs=80, warps=4, shared=38916) == 5  # shared memory bound
    assert tri.residency(regs=168, warps=4, shared=20000) == 3  # register bound
    assert tri.residency(regs=32, warps=1, shared=0) == 32  # the block limit
    cpu = torch.device("cpu")  # 4 stand-in multiprocessors
    assert tri.decode_num_splits(1, 2, 10_000_000, cpu, resident_per_sm=5) == 2 * 5 * 4 // 2
    assert tri.decode_num_splits(1, 2, 10_000_000, cpu) == 12 * 4 // 2
