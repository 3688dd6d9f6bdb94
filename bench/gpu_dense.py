"""The dense kernels' rows in the GPU suite (bench/gpu_suite.py), and the case builders the CPU tests share.

Checks: cache write, split-KV decode, chunked prefill, mixed batches, padded (CUDA-graph) batches, a
captured decode graph replayed at other context lengths; each against a float64 reference computed from
the same inputs, outputs poisoned with NaN first, unused cache slots filled with NaN.
Timings: paged decode against torch SDPA on contiguous K/V (128K .. 10M tokens), chunked prefill of a
long prompt against SDPA's flash path on the whole prompt, the cache write, and config sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..kernels.base import AttentionMetadata
from ..kernels.reference import dense as ref
from .gpu_suite import CheckResult, SuiteContext, TimingRow, capture_graph, check, relative_error, timing

K = 1024
M = 1024 * 1024


# ------------------------------------------------------------------------------------------ builders

@dataclass
class DenseCase:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, Hkv, page, D], every context token written, unused slots NaN
    v_cache: torch.Tensor
    meta: AttentionMetadata


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def make_metadata(seqs: list[tuple[int, int]], block_tables: torch.Tensor, page: int, device: torch.device,
                  slot_mapping: torch.Tensor | None = None) -> AttentionMetadata:
    """Metadata for sequences given as (context_len after this step, query_len); step tokens are the last
    query_len of each context."""
    positions = [p for c, n in seqs for p in range(c - n, c)]
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    tokens = starts[-1]
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=(slot_mapping if slot_mapping is not None
                      else torch.full((tokens,), -1, dtype=torch.int64, device=device)),
        block_tables=block_tables.to(device=device, dtype=torch.int32),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        block_size=page,
        context_lens_cpu=[c for c, _ in seqs],
        query_lens_cpu=[n for _, n in seqs],
    )


def make_case(seqs: list[tuple[int, int]], *, kv_heads: int, group: int, head_dim: int, page: int,
              dtype: torch.dtype, device: torch.device, generator: torch.Generator,
              spare_blocks: int = 3) -> DenseCase:
    """A random paged batch: each sequence's blocks are scattered (random physical ids), every context
    token is in the cache, every other cache slot holds NaN (so reading past a context shows)."""
    blocks_per_seq = [-(-c // page) for c, _ in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    physical = torch.randperm(num_blocks, generator=generator, device=device)
    table = torch.zeros(len(seqs), max(1, max(blocks_per_seq, default=1)), dtype=torch.int32, device=device)
    k_cache = torch.full((num_blocks, kv_heads, page, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for i, ((context, _), nb) in enumerate(zip(seqs, blocks_per_seq)):
        if nb == 0:
            continue
        ids = physical[used:used + nb]
        used += nb
        table[i, :nb] = ids.to(torch.int32)
        for cache in (k_cache, v_cache):
            data = _randn((kv_heads, nb, page, head_dim), dtype, device, generator)
            data[:, -1, context - (nb - 1) * page:] = float("nan")  # past the context: must never be read
            cache[ids] = data.permute(1, 0, 2, 3)
    tokens = sum(n for _, n in seqs)
    q = _randn((tokens, kv_heads * group, head_dim), dtype, device, generator)
    return DenseCase(q, k_cache, v_cache, make_metadata(seqs, table, page, device))


def reference_f64(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention over the paged cache in float64: out [T, Hq, D], lse [T, Hq] (-inf and 0
    where a row sees no key). Rows of sequences with no query tokens stay 0."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(tokens, q_heads, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((tokens, q_heads), float("-inf"), dtype=torch.float64, device=q.device)
    start = 0
    for i, (context, n) in enumerate(zip(meta.context_lens_cpu, meta.query_lens_cpu)):
        if n == 0:
            continue
        k = ref.gather_kv(k_cache, meta.block_tables[i], context).double()  # [Hkv, ctx, D]
        v = ref.gather_kv(v_cache, meta.block_tables[i], context).double()
        key_pos = torch.arange(context, device=q.device)
        tile = max(1, (1 << 26) // max(1, q_heads * context))  # bound the float64 score tensor
        for s in range(start, start + n, tile):
            e = min(start + n, s + tile)
            qq = q[s:e].double().permute(1, 0, 2).reshape(kv_heads, group * (e - s), head_dim)
            scores = torch.bmm(qq, k.transpose(1, 2)).view(kv_heads, group, e - s, context) * scale
            mask = key_pos[None, :] <= meta.positions[s:e, None]
            scores = scores.masked_fill(~mask, float("-inf"))
            row_lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, m]
            probs = torch.nan_to_num(torch.exp(scores - row_lse[..., None]), nan=0.0)
            o = torch.bmm(probs.view(kv_heads, group * (e - s), context), v).view(kv_heads, group, e - s, head_dim)
            out[s:e] = o.permute(2, 0, 1, 3).reshape(e - s, q_heads, head_dim)
            lse[s:e] = row_lse.permute(2, 0, 1).reshape(e - s, q_heads)
        start += n
    return out, lse


def lse_error(lse: torch.Tensor, ref_lse: torch.Tensor) -> float:
    """Relative error of the finite entries; nan when the -inf pattern differs or lse has NaN."""
    finite = torch.isfinite(ref_lse)
    if bool(torch.isnan(lse).any()) or not torch.equal(torch.isfinite(lse), finite):
        return float("nan")
    if not bool(finite.any()):
        return 0.0
    return relative_error(lse[finite], ref_lse[finite])


def _tag(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def _tri():
    from ..kernels.triton import dense as tri
    return tri


def run_and_compare(ctx: SuiteContext, name: str, case_name: str, case: DenseCase, dtype: torch.dtype,
                    num_splits: int | None = None, scale: float | None = None) -> list[CheckResult]:
    """Poison the output, run the Triton path, compare out and lse with the float64 reference."""
    tri = _tri()
    out = torch.full_like(case.q, float("nan"))
    lse = torch.full(case.q.shape[:2], float("nan"), dtype=torch.float32, device=case.q.device)
    tri.POISON_WORKSPACE = True
    try:
        tri.paged_attention_with_lse(case.q, case.k_cache, case.v_cache, case.meta, scale, out=out, lse=lse,
                                     num_splits=num_splits)
    finally:
        tri.POISON_WORKSPACE = False
    ref_out, ref_lse = reference_f64(case.q, case.k_cache, case.v_cache, case.meta, scale)
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-3
    lse_err = lse_error(lse, ref_lse)
    return [ctx.compare(name, case_name, out, ref_out, dtype),
            CheckResult(name, case_name + " lse", lse_err, lse_tol, bool(lse_err <= lse_tol))]


# --------------------------------------------------------------------------------------------- checks

def _head_layouts(ctx: SuiteContext) -> list[tuple[int, int, int, int]]:
    """(kv_heads, group, head_dim, page): GQA 1/4/8, head_dim 64/128/256, blocks 16..128."""
    if ctx.tiny:
        return [(2, 1, 64, 16), (1, 4, 128, 32), (1, 8, 64, 16)]
    if ctx.quick:
        return [(8, 4, 128, 64), (2, 8, 64, 16)]
    return [(8, 4, 128, 64), (4, 1, 128, 16), (2, 8, 64, 32), (2, 4, 256, 128), (8, 4, 128, 16)]


@check("dense.write_kv", order=10)
def check_write_kv(ctx: SuiteContext):
    tri = _tri()
    for dtype in ctx.dtypes():
        for kv_heads, _, head_dim, page in _head_layouts(ctx)[:2]:
            g = ctx.generator()
            num_blocks = 5 if ctx.tiny else 64
            tokens = 37 if ctx.tiny else 1000
            slots = torch.randperm(num_blocks * page, device=ctx.device, generator=g)[:tokens]
            slots[torch.rand(tokens, device=ctx.device, generator=g) < 0.15] = -1  # padded rows: skipped
            k = _randn((tokens, kv_heads, head_dim), dtype, ctx.device, g)
            v = _randn((tokens, kv_heads, head_dim), dtype, ctx.device, g)
            k_cache = torch.full((num_blocks, kv_heads, page, head_dim), float("nan"), dtype=dtype, device=ctx.device)
            v_cache = torch.full_like(k_cache, float("nan"))
            tri.write_kv(k_cache, v_cache, k, v, slots)
            keep = slots >= 0
            kept = slots[keep]
            got_k = k_cache[kept // page, :, kept % page]
            got_v = v_cache[kept // page, :, kept % page]
            wrong = 0.0
            if bool(keep.any()):
                wrong = float((got_k.double() - k[keep].double()).abs().max()
                              + (got_v.double() - v[keep].double()).abs().max())
            untouched = int(torch.isnan(k_cache).sum() + torch.isnan(v_cache).sum())
            expected = 2 * (k_cache.numel() - int(keep.sum()) * kv_heads * head_dim)
            ok = wrong == 0.0 and untouched == expected
            yield CheckResult("dense.write_kv", f"{_tag(dtype)} Hkv{kv_heads} D{head_dim} bs{page} T{tokens}",
                              wrong if untouched == expected else float("nan"), 0.0, ok,
                              "" if ok else f"max diff {wrong}, NaN slots {untouched} (want {expected})")


def _decode_contexts(ctx: SuiteContext, page: int) -> list[int]:
    if ctx.tiny:
        return [1, page - 1, page, page + 1, 3 * page + 7]
    base = [1, page - 1, page, page + 1, 1000, 4 * page + 3]
    return base if ctx.quick else base + [4096, 8191]


@check("dense.decode", order=20)
def check_decode(ctx: SuiteContext):
    for dtype in ctx.dtypes():
        for kv_heads, group, head_dim, page in _head_layouts(ctx):
            seqs = [(c, 1) for c in _decode_contexts(ctx, page)]
            for splits in ((None, 3) if ctx.tiny else (None, 1, 3)):
                case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                                 device=ctx.device, generator=ctx.generator())
                label = (f"{_tag(dtype)} G{group} Hkv{kv_heads} D{head_dim} bs{page} ctx{[c for c, _ in seqs]} "
                         f"splits={splits or 'auto'}")
                for r in run_and_compare(ctx, "dense.decode", label, case, dtype, num_splits=splits):
                    yield r
    if not ctx.tiny:  # long context at the production layout: the automatic split count at work
        for dtype in ctx.dtypes()[1:]:
            contexts = [65536 + 17] if ctx.quick else [65536 + 17, 200_000]
            for c in contexts:
                case = make_case([(c, 1)], kv_heads=8, group=4, head_dim=128, page=64, dtype=dtype,
                                 device=ctx.device, generator=ctx.generator())
                for r in run_and_compare(ctx, "dense.decode", f"{_tag(dtype)} G4 Hkv8 D128 bs64 ctx{c}", case, dtype):
                    yield r


def _prefill_batches(ctx: SuiteContext, page: int) -> list[list[tuple[int, int]]]:
    """(context, query_len) batches: fresh prompts, chunks after a cached prefix, odd and boundary sizes."""
    if ctx.tiny:
        return [[(37, 37), (page * 3, page), (2 * page + 5, 19)]]
    batches = [[(37, 37), (page * 8, page), (1000, 300), (513, 2)], [(4096, 512), (4096 + 129, 129)]]
    return batches if ctx.quick else batches + [[(8192, 8192)], [(20000, 1024), (777, 777)]]


@check("dense.prefill", order=30)
def check_prefill(ctx: SuiteContext):
    for dtype in ctx.dtypes():
        for kv_heads, group, head_dim, page in _head_layouts(ctx):
            for seqs in _prefill_batches(ctx, page):
                case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                                 device=ctx.device, generator=ctx.generator())
                label = f"{_tag(dtype)} G{group} Hkv{kv_heads} D{head_dim} bs{page} {seqs}"
                for r in run_and_compare(ctx, "dense.prefill", label, case, dtype):
                    yield r


@check("dense.mixed", order=40)
def check_mixed(ctx: SuiteContext):
    """Prefill chunks and decode tokens in one step (and an empty entry), in both kernels at once."""
    for dtype in ctx.dtypes():
        for kv_heads, group, head_dim, page in _head_layouts(ctx)[:2]:
            if ctx.tiny:
                seqs = [(page + 3, 1), (2 * page, 2 * page), (5, 0), (3 * page + 1, page + 1), (page, 1)]
            else:
                seqs = [(3000, 1), (4096, 512), (77, 0), (1000, 1000), (64, 1), (2049, 33)]
            case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                             device=ctx.device, generator=ctx.generator())
            label = f"{_tag(dtype)} G{group} Hkv{kv_heads} D{head_dim} bs{page} {seqs}"
            for r in run_and_compare(ctx, "dense.mixed", label, case, dtype, scale=0.3 if ctx.tiny else None):
                yield r


@check("dense.padded_batch", order=50)
def check_padded_batch(ctx: SuiteContext):
    """A CUDA-graph batch bucket: real decode rows plus padding rows (context 0, slot -1). The padding must
    come out as zeros (not NaN), the cache must be untouched by padded writes, the real rows right."""
    tri = _tri()
    dtype = torch.float16
    kv_heads, group, head_dim, page = _head_layouts(ctx)[0]
    seqs = [(page + 5, 1), (0, 1), (3, 1), (0, 1)]
    case = make_case(seqs, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page, dtype=dtype,
                     device=ctx.device, generator=ctx.generator())
    before = case.k_cache.clone()
    pad = torch.tensor([-1], dtype=torch.int64, device=ctx.device)
    k_new = _randn((1, kv_heads, head_dim), dtype, ctx.device, ctx.generator())
    tri.write_kv(case.k_cache, case.v_cache, k_new, k_new, pad)
    untouched = torch.equal(torch.isnan(before), torch.isnan(case.k_cache)) and torch.equal(
        torch.nan_to_num(before), torch.nan_to_num(case.k_cache))
    results = run_and_compare(ctx, "dense.padded_batch", f"f16 {seqs}", case, dtype, num_splits=2)
    for r in results:
        if not untouched:
            r.passed, r.detail = False, "a write with slot -1 changed the cache"
        yield r


@check("dense.cuda_graph", order=60)
def check_cuda_graph(ctx: SuiteContext):
    """Decode captured once in a CUDA graph (split count fixed for the bucket's longest context), replayed
    after the context lengths changed on the device: replays must match the reference at the new lengths."""
    if not ctx.cuda:
        yield CheckResult("dense.cuda_graph", "needs CUDA", float("nan"), 0.0, False, skipped=True)
        return
    tri = _tri()
    for dtype in (torch.bfloat16, torch.float16):
        kv_heads, group, head_dim, page = 8, 4, 128, 64
        longest = 3000
        case = make_case([(longest, 1)] * 4, kv_heads=kv_heads, group=group, head_dim=head_dim, page=page,
                         dtype=dtype, device=ctx.device, generator=ctx.generator())
        meta = case.meta
        out = torch.full_like(case.q, float("nan"))
        splits = tri.decode_num_splits(4, kv_heads, longest, ctx.device)

        def run():
            tri.paged_attention(case.q, case.k_cache, case.v_cache, meta, out=out, num_splits=splits)
        replay = capture_graph(run, ctx.device)
        for new_lens in ([longest, 1, 64, 65], [17, 2999, 128, 1000]):
            meta.context_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            meta.positions.copy_(torch.tensor([c - 1 for c in new_lens], dtype=torch.int64))
            out.fill_(float("nan"))
            replay()
            torch.cuda.synchronize()
            shadow = replace(meta, context_lens_cpu=list(new_lens))
            ref_out, _ = reference_f64(case.q, case.k_cache, case.v_cache, shadow)
            yield ctx.compare("dense.cuda_graph", f"{_tag(dtype)} replay ctx{new_lens} splits={splits}", out,
                              ref_out, dtype)


# -------------------------------------------------------------------------------------------- timings

def _free_bytes(ctx: SuiteContext) -> int:
    if not ctx.cuda:
        return 1 << 40
    torch.cuda.empty_cache()  # blocks the caching allocator holds from the previous row count as free
    free, _ = torch.cuda.mem_get_info(ctx.device)
    return free


def _sdpa(q, k, v, *, causal: bool, gqa: bool):
    """SDPA restricted to its flash kernel; returns (output, label). Falls back to the default choice
    (and says so) where flash refuses the inputs."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kwargs = {"is_causal": causal}
    if gqa:
        kwargs["enable_gqa"] = True
    if q.is_cuda:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, **kwargs), "sdpa-flash"
        except RuntimeError:
            pass
    return F.scaled_dot_product_attention(q, k, v, **kwargs), "sdpa"


def _decode_shapes(ctx: SuiteContext) -> list[tuple[int, int]]:
    """(batch, context tokens)."""
    if ctx.tiny:
        return [(1, 1000), (2, 300)]
    if ctx.quick:
        return [(1, 128 * K), (1, 1 * M), (8, 128 * K)]
    return [(1, 128 * K), (1, 1 * M), (1, 4 * M), (1, 10 * M), (8, 128 * K)]


def _decode_setup(ctx: SuiteContext, batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
                  page: int, dtype: torch.dtype):
    """Contiguous K/V for SDPA and a paged view of them for our kernel. Batch 1 shares the storage (10M
    tokens of K and V fit only once in 80 GB): the block table walks the blocks in a random order, which
    decode cannot tell apart (every key is visible) but which scatters its reads like a real cache.
    Larger batches get their own scattered copy."""
    g = ctx.generator()
    context = -(-context // page) * page
    blocks = context // page
    storage_k = torch.randn((kv_heads, batch * context, head_dim), generator=g, device=ctx.device, dtype=dtype)
    storage_v = torch.randn((kv_heads, batch * context, head_dim), generator=g, device=ctx.device, dtype=dtype)
    sdpa_k = storage_k.view(kv_heads, batch, context, head_dim).permute(1, 0, 2, 3)
    sdpa_v = storage_v.view(kv_heads, batch, context, head_dim).permute(1, 0, 2, 3)
    if batch == 1:
        k_cache = storage_k.view(kv_heads, blocks, page, head_dim).permute(1, 0, 2, 3)
        v_cache = storage_v.view(kv_heads, blocks, page, head_dim).permute(1, 0, 2, 3)
        table = torch.randperm(blocks, generator=g, device=ctx.device).view(1, blocks)
    else:
        sdpa_k, sdpa_v = sdpa_k.contiguous(), sdpa_v.contiguous()
        del storage_k, storage_v
        physical = torch.randperm(batch * blocks, generator=g, device=ctx.device)
        table = physical.view(batch, blocks)
        k_cache = torch.empty((batch * blocks, kv_heads, page, head_dim), device=ctx.device, dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        # logical block (b, j) of SDPA's layout goes to physical block table[b, j]
        k_cache[physical] = sdpa_k.reshape(batch, kv_heads, blocks, page, head_dim).permute(0, 2, 1, 3, 4) \
            .reshape(batch * blocks, kv_heads, page, head_dim)
        v_cache[physical] = sdpa_v.reshape(batch, kv_heads, blocks, page, head_dim).permute(0, 2, 1, 3, 4) \
            .reshape(batch * blocks, kv_heads, page, head_dim)
    q = torch.randn((batch, q_heads, head_dim), generator=g, device=ctx.device, dtype=dtype)
    meta = make_metadata([(context, 1)] * batch, table, page, ctx.device)
    return q, k_cache, v_cache, sdpa_k, sdpa_v, meta, context


@timing("dense.decode", order=10)
def time_decode(ctx: SuiteContext):
    tri = _tri()
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    q_heads, kv_heads, head_dim, page = (32, 8, 128, 64) if not ctx.tiny else (8, 2, 128, 16)
    group = q_heads // kv_heads
    for batch, context in _decode_shapes(ctx):
        label = f"B{batch} ctx {_tokens(context)} bf16" if ctx.cuda else f"B{batch} ctx {context} f16 (tiny)"
        need = 2 * batch * context * kv_heads * head_dim * dtype.itemsize * (1 if batch == 1 else 2)
        if need > 0.9 * _free_bytes(ctx):
            yield TimingRow("dense.decode", label, None, note=f"skipped: needs {need / 2**30:.0f} GiB")
            continue
        if ctx.remaining_s() < 20:
            yield TimingRow("dense.decode", label, None, note="skipped: time budget")
            continue
        q, k_cache, v_cache, sdpa_k, sdpa_v, meta, context = _decode_setup(
            ctx, batch, context, q_heads, kv_heads, head_dim, page, dtype)
        out = torch.empty_like(q)
        ours = ctx.time_ms(lambda: tri.paged_attention(q, k_cache, v_cache, meta, out=out), graph=True)
        sdpa_q = q.view(batch, kv_heads, group, head_dim)  # GQA as kv-head-major MHA with G query rows
        sdpa_out, which = _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=False, gqa=False)
        base = ctx.time_ms(lambda: _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=False, gqa=False), graph=ctx.cuda)
        err = relative_error(out, sdpa_out.reshape(batch, q_heads, head_dim))
        splits = tri.decode_num_splits(batch, kv_heads, context, ctx.device)
        yield TimingRow("dense.decode", label, ours, baseline=which, baseline_ms=base,
                        bytes_moved=2 * batch * context * kv_heads * head_dim * dtype.itemsize,
                        flops=4 * batch * q_heads * context * head_dim,
                        note=f"splits={splits} err_vs_sdpa={err:.1e}",
                        extra={"batch": batch, "context": context, "q_heads": q_heads, "kv_heads": kv_heads,
                               "head_dim": head_dim, "block_size": page, "splits": splits, "err_vs_sdpa": err})
        del q, k_cache, v_cache, sdpa_k, sdpa_v, out, sdpa_out


def _tokens(n: int) -> str:
    return f"{n // M}M" if n % M == 0 else f"{n // K}K" if n % K == 0 else str(n)


@timing("dense.prefill", order=20)
def time_prefill(ctx: SuiteContext):
    """Chunked prefill of one long prompt (the cache written chunk by chunk beforehand, attention timed)
    against SDPA's flash kernel on the whole prompt at once, which is the ideal a chunked path chases."""
    tri = _tri()
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    if ctx.tiny:
        prompt, chunk, q_heads, kv_heads, head_dim, page = 256, 64, 8, 2, 64, 16
    else:
        prompt, chunk, q_heads, kv_heads, head_dim, page = (32 * K if ctx.quick else 128 * K), 8 * K, 32, 8, 128, 64
    label = f"{_tokens(prompt)} prompt, {_tokens(chunk)} chunks" + (" (tiny)" if ctx.tiny else "")
    if ctx.remaining_s() < 30:
        yield TimingRow("dense.prefill", label, None, note="skipped: time budget")
        return
    rows = _prefill_run(ctx, tri, prompt, chunk, q_heads, kv_heads, head_dim, page, dtype, configs=[None])
    yield from rows


def _prefill_run(ctx, tri, prompt, chunk, q_heads, kv_heads, head_dim, page, dtype, configs, name="dense.prefill"):
    g = ctx.generator()
    group = q_heads // kv_heads
    q = torch.randn((prompt, q_heads, head_dim), generator=g, device=ctx.device, dtype=dtype)
    k = torch.randn((prompt, kv_heads, head_dim), generator=g, device=ctx.device, dtype=dtype)
    v = torch.randn((prompt, kv_heads, head_dim), generator=g, device=ctx.device, dtype=dtype)
    blocks = -(-prompt // page)
    table = torch.randperm(blocks, generator=g, device=ctx.device).view(1, blocks)
    k_cache = torch.empty((blocks, kv_heads, page, head_dim), device=ctx.device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    metas = []
    for start in range(0, prompt, chunk):
        n = min(chunk, prompt - start)
        pos = torch.arange(start, start + n, device=ctx.device)
        slots = table[0, pos // page].long() * page + pos % page
        metas.append((start, n, make_metadata([(start + n, n)], table, page, ctx.device, slot_mapping=slots)))
    for start, n, meta in metas:  # the cache write, as the engine does it chunk by chunk
        tri.write_kv(k_cache, v_cache, k[start:start + n], v[start:start + n], meta.slot_mapping)
    write_ms = ctx.time_ms(lambda: [tri.write_kv(k_cache, v_cache, k[s:s + n], v[s:s + n], m.slot_mapping)
                                    for s, n, m in metas])
    out = torch.empty_like(q)

    # [1, heads, tokens, D], contiguous so that SDPA's time holds no copies
    sdpa_q = q.transpose(0, 1).unsqueeze(0).contiguous()
    sdpa_k = k.transpose(0, 1).unsqueeze(0).contiguous()
    sdpa_v = v.transpose(0, 1).unsqueeze(0).contiguous()
    try:
        sdpa_out, which = _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=True, gqa=True)
        gqa = True
    except (RuntimeError, TypeError):  # no enable_gqa: give SDPA the expanded heads
        sdpa_k = sdpa_k.repeat_interleave(group, dim=1)
        sdpa_v = sdpa_v.repeat_interleave(group, dim=1)
        sdpa_out, which = _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=True, gqa=False)
        gqa = False
    base = ctx.time_ms(lambda: _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=True, gqa=gqa), target_s=1.0, max_reps=10)
    reference = sdpa_out[0].transpose(0, 1)
    flops = 4 * q_heads * head_dim * prompt * (prompt + 1) / 2
    rows = []
    for cfg in configs:
        def run():
            for start, n, meta in metas:
                tri.paged_attention(q[start:start + n], k_cache, v_cache, meta, out=out[start:start + n], config=cfg)
        out.fill_(float("nan"))
        ours = ctx.time_ms(run, target_s=1.0, max_reps=10)
        err = relative_error(out, reference)
        label = f"{_tokens(prompt)} prompt, {_tokens(chunk)} chunks" + (" (tiny)" if ctx.tiny else "")
        note = f"err_vs_sdpa={err:.1e}" + ("" if gqa else " sdpa on expanded heads")
        if cfg is not None:
            label = f"rows{cfg.prefill_rows} n{cfg.prefill_block_n} w{cfg.prefill_warps} s{cfg.prefill_stages}"
        else:
            note += f" write_kv={write_ms:.2f}ms"
        rows.append(TimingRow(name, label, ours, baseline=which, baseline_ms=base, flops=flops, note=note,
                              extra={"prompt": prompt, "chunk": chunk, "q_heads": q_heads, "kv_heads": kv_heads,
                                     "head_dim": head_dim, "block_size": page, "err_vs_sdpa": err,
                                     "write_kv_ms": write_ms, "config": None if cfg is None else vars(cfg)}))
    return rows


@timing("dense.write_kv", order=30)
def time_write_kv(ctx: SuiteContext):
    tri = _tri()
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    tokens, kv_heads, head_dim, page = (8 * K, 8, 128, 64) if not ctx.tiny else (64, 2, 64, 16)
    g = ctx.generator()
    blocks = 4 * tokens // page
    k_cache = torch.empty((blocks, kv_heads, page, head_dim), device=ctx.device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k = torch.randn((tokens, kv_heads, head_dim), generator=g, device=ctx.device, dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(blocks * page, generator=g, device=ctx.device)[:tokens]
    ms = ctx.time_ms(lambda: tri.write_kv(k_cache, v_cache, k, v, slots), graph=ctx.cuda)
    yield TimingRow("dense.write_kv", f"{tokens} tokens scattered", ms,
                    bytes_moved=2 * 2 * tokens * kv_heads * head_dim * dtype.itemsize)


@timing("dense.decode-tune", order=50)
def time_decode_tune(ctx: SuiteContext):
    """Decode configurations at 1M tokens (batch 1) and 128K (batch 8): which tile, warps, stages and
    split count the defaults should be."""
    if ctx.quick:
        return
    tri = _tri()
    dtype = torch.bfloat16
    for batch, context in ((1, 1 * M), (8, 128 * K)):
        if ctx.remaining_s() < 40:
            yield TimingRow("dense.decode-tune", f"B{batch} {_tokens(context)}", None, note="skipped: time budget")
            return
        q, k_cache, v_cache, sdpa_k, sdpa_v, meta, context = _decode_setup(ctx, batch, context, 32, 8, 128, 64, dtype)
        group = 4
        sdpa_q = q.view(batch, 8, group, 128)
        base = ctx.time_ms(lambda: _sdpa(sdpa_q, sdpa_k, sdpa_v, causal=False, gqa=False), graph=True)
        auto = tri.decode_num_splits(batch, 8, context, ctx.device)
        out = torch.empty_like(q)
        for block_n, warps, stages in ((64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4), (64, 4, 4)):
            cfg = replace(tri.default_config(128, dtype), decode_block_n=block_n, decode_warps=warps,
                          decode_stages=stages)
            for splits in (auto // 2, auto, auto * 2):
                if splits < 1 or ctx.remaining_s() < 15:
                    continue
                ms = ctx.time_ms(lambda: tri.paged_attention(q, k_cache, v_cache, meta, out=out, num_splits=splits,
                                                             config=cfg), graph=True)
                yield TimingRow("dense.decode-tune", f"B{batch} {_tokens(context)} n{block_n} w{warps} s{stages} "
                                f"sp{splits}", ms, baseline="sdpa-flash", baseline_ms=base,
                                bytes_moved=2 * batch * context * 8 * 128 * dtype.itemsize,
                                extra={"block_n": block_n, "warps": warps, "stages": stages, "splits": splits})
        del q, k_cache, v_cache, sdpa_k, sdpa_v, out


@timing("dense.prefill-tune", order=60)
def time_prefill_tune(ctx: SuiteContext):
    if ctx.quick:
        return
    if ctx.remaining_s() < 60:
        yield TimingRow("dense.prefill-tune", "32K prompt", None, note="skipped: time budget")
        return
    tri = _tri()
    base = tri.default_config(128, torch.bfloat16)
    configs = [replace(base, prefill_rows=r, prefill_block_n=n, prefill_warps=w, prefill_stages=s)
               for r, n, w, s in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                  (128, 32, 8, 4), (256, 64, 8, 2))]
    yield from _prefill_run(ctx, tri, 32 * K, 8 * K, 32, 8, 128, 64, torch.bfloat16, configs, name="dense.prefill-tune")


@timing("dense.flash-attn", order=40)
def time_flash_attn(ctx: SuiteContext):
    """flash-attn's paged decode, when the optional package is installed (its own [blocks, page, Hkv, D]
    cache layout), at 1M tokens beside ours."""
    if not ctx.cuda:
        return
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        yield TimingRow("dense.flash-attn", "1M decode", None, note="flash-attn not installed")
        return
    tri = _tri()
    dtype, batch, context, page = torch.bfloat16, 1, 1 * M, 256
    q, k_cache, v_cache, sdpa_k, sdpa_v, meta, context = _decode_setup(ctx, batch, context, 32, 8, 128, page, dtype)
    blocks = context // page
    fa_k = sdpa_k[0].reshape(8, blocks, page, 128).permute(1, 2, 0, 3).contiguous()
    fa_v = sdpa_v[0].reshape(8, blocks, page, 128).permute(1, 2, 0, 3).contiguous()
    table = torch.arange(blocks, device=ctx.device, dtype=torch.int32).view(1, blocks)
    seqlens = torch.tensor([context], device=ctx.device, dtype=torch.int32)
    fa_q = q.view(1, 1, 32, 128)
    fa_ms = ctx.time_ms(lambda: flash_attn_with_kvcache(fa_q, fa_k, fa_v, cache_seqlens=seqlens, block_table=table),
                        graph=True)
    out = torch.empty_like(q)
    ours = ctx.time_ms(lambda: tri.paged_attention(q, k_cache, v_cache, meta, out=out), graph=True)
    yield TimingRow("dense.flash-attn", "1M decode bs256", ours, baseline="flash-attn paged", baseline_ms=fa_ms,
                    bytes_moved=2 * context * 8 * 128 * dtype.itemsize)
