"""Superlinear span attention rows in the GPU suite (bench/gpu_suite.py).

Checks (Triton against float64 PyTorch references computed from the same inputs, outputs poisoned first):
  superlinear.search     the selected spans equal the reference search's (anchor and summary search)
  superlinear.attention  sparse range attention over the selected spans + window (decode split-K path and
                         the tiled prefill path, union and gate) against the float64 range reference
  superlinear.end2end    the whole layer (search + attention) in float32 against the float64 reference
  superlinear.cuda_graph a decode step captured once, replayed at other positions; no host sync when run
  superlinear.needle     summary search finds a key planted anywhere in a long context
Timings (32 query / 8 KV heads, head_dim 128, bf16, batch 1, 64-token blocks):
  superlinear.decode     one layer's decode step at 1M and 10M tokens (search + attention, CUDA graph)
                         against our dense paged decode kernel on the same cache; target >= 15x / >= 60x
  superlinear.prefill    a 1M-token prompt through one layer in chunks (cache write, bounds, search,
                         attention); target <= 2 s. Dense chunked prefill at 128K for scale.
Without CUDA the suite runs these at tiny shapes in the Triton interpreter (a smoke test of this file).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..kernels.base import AttentionMetadata, LayerCache
from ..kernels.reference import sparse as sparse_ref
from ..kernels.reference import superlinear as ref
from ..kernels.superlinear import BACKEND_DEFAULTS, backend_params, make_params
from .gpu_suite import CheckResult, SuiteContext, TimingRow, capture_graph, check, relative_error, timing

K = 1024
M = 1024 * 1024

MODES = [("anchor", "gate"), ("summary", "union")]  # published method; engine default for plain checkpoints


def _tri():
    from ..kernels.triton import superlinear as tri
    return tri


def _sparse_tri():
    from ..kernels.triton import sparse as sparse_tri
    return sparse_tri


def _dense_tri():
    from ..kernels.triton import dense as dense_tri
    return dense_tri


def _tag(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def _tokens(n: int) -> str:
    return f"{n // M}M" if n % M == 0 else f"{n // K}K" if n % K == 0 else str(n)


def _free_bytes(ctx: SuiteContext) -> int:
    if not ctx.cuda:
        return 1 << 40
    return torch.cuda.mem_get_info(ctx.device)[0]


# ------------------------------------------------------------------------------------------ builders

def make_meta(seqs: list[tuple[int, int]], table: torch.Tensor, page: int, device: torch.device,
              slot_mapping: torch.Tensor | None = None) -> AttentionMetadata:
    """(context_len after the step, query_len) per sequence; the step tokens are each context's last ones."""
    positions = [p for c, n in seqs for p in range(c - n, c)]
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=(slot_mapping if slot_mapping is not None
                      else torch.full((starts[-1],), -1, dtype=torch.int64, device=device)),
        block_tables=table.to(device=device, dtype=torch.int32),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device), block_size=page,
        context_lens_cpu=[c for c, _ in seqs], query_lens_cpu=[n for _, n in seqs])


def make_cache(ctx: SuiteContext, contexts: list[int], kv_heads: int, head_dim: int, page: int,
               dtype: torch.dtype, bounds: bool) -> tuple[LayerCache, torch.Tensor]:
    """A paged cache holding random keys/values for sequences of the given lengths (random physical
    blocks), with exact per-block kmin/kmax/kmean when `bounds` (summary search reads kmin/kmax with
    score "bound", kmean with score "mean"). Returns (cache, block table)."""
    g = ctx.generator()
    nbs = [-(-c // page) for c in contexts]
    total = sum(nbs)
    physical = torch.randperm(total, generator=g, device=ctx.device)
    table = torch.zeros(len(contexts), max(nbs), dtype=torch.int32, device=ctx.device)
    at = 0
    for i, nb in enumerate(nbs):
        table[i, :nb] = physical[at:at + nb].to(torch.int32)
        at += nb
    shape = (total, kv_heads, page, head_dim)
    cache = LayerCache(torch.empty(shape, dtype=dtype, device=ctx.device), torch.empty(shape, dtype=dtype, device=ctx.device))
    step = max(1, (1 << 28) // (kv_heads * page * head_dim))  # fill in slices: 10M tokens do not fit twice
    for s in range(0, total, step):
        e = min(total, s + step)
        for t in (cache.k, cache.v):
            t[s:e] = torch.randn((e - s,) + shape[1:], generator=g, device=ctx.device, dtype=torch.float32).to(dtype)
    if bounds:
        cache.aux["kmin"] = torch.empty(total, kv_heads, head_dim, dtype=dtype, device=ctx.device)
        cache.aux["kmax"] = torch.empty_like(cache.aux["kmin"])
        cache.aux["kmean"] = torch.empty_like(cache.aux["kmin"])
        for s in range(0, total, step):
            e = min(total, s + step)
            cache.aux["kmin"][s:e] = cache.k[s:e].amin(2)
            cache.aux["kmax"][s:e] = cache.k[s:e].amax(2)
            cache.aux["kmean"][s:e] = cache.k[s:e].float().mean(2).to(dtype)
        # partial last blocks: summaries over their filled slots only
        for i, (c, nb) in enumerate(zip(contexts, nbs)):
            fill = c - (nb - 1) * page
            if fill < page:
                b = int(table[i, nb - 1])
                cache.aux["kmin"][b] = cache.k[b, :, :fill].amin(1)
                cache.aux["kmax"][b] = cache.k[b, :, :fill].amax(1)
                cache.aux["kmean"][b] = cache.k[b, :, :fill].float().mean(1).to(dtype)
    return cache, table


def reference_selection(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, params) -> torch.Tensor:
    """The reference search in float64: [T, Hq, K, 2] [start, end) ranges of the selected spans (gate mode
    ranges: not clipped against each other), sorted by start; (0, 0) where no span."""
    from ..kernels.reference import dense as dense_ref
    from ..kernels.superlinear import gather_block_bounds

    tokens, hq, _ = q.shape
    out = []
    start = 0
    for i, (c, n) in enumerate(zip(meta.context_lens_cpu, meta.query_lens_cpu)):
        keys = dense_ref.gather_kv(cache.k, meta.block_tables[i], c).double()
        bounds = None
        if params.search == "summary":
            bounds = tuple(b.double() for b in gather_block_bounds(cache, meta.block_tables[i], c, params))
        sel, _ = ref.select_spans(q[start:start + n].double().transpose(0, 1), keys, meta.positions[start:start + n],
                                  params, bounds=bounds, block_size=cache.k.shape[2])
        r = torch.stack([sel.starts, sel.ends + 1], -1)  # [Hq, n, K, 2]
        r = torch.where(sel.valid[..., None], r, torch.zeros_like(r)).transpose(0, 1)
        out.append(r)
        start += n
    r = torch.cat(out).to(torch.int64)
    return _sorted_ranges(r)


def _sorted_ranges(r: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(r[..., 0] * (1 << 32) + r[..., 1], dim=-1)
    return torch.gather(r, 2, order[..., None].expand_as(r))


def _layouts(ctx: SuiteContext):
    """(q_heads, kv_heads, head_dim, page, contexts for the checks)."""
    if ctx.tiny:
        return [(4, 2, 16, 16, [700, 333])]
    if ctx.quick:
        return [(32, 8, 128, 64, [50_000, 20_011])]
    return [(32, 8, 128, 64, [50_000, 20_011]), (16, 2, 64, 16, [70_001, 9_000])]


def _step(contexts: list[int], chunk: int) -> list[tuple[int, int]]:
    """A mixed step: a decode token for every sequence but the last, a prefill chunk ending the last."""
    return [(c, 1) for c in contexts[:-1]] + [(contexts[-1], chunk)]


def _check_params(ctx: SuiteContext, search: str, combine: str):
    if ctx.tiny:
        return make_params(dict(sw_index=3, search=search, combine=combine))  # window 15
    return make_params(dict(search=search, combine=combine))


# --------------------------------------------------------------------------------------------- checks

@check("superlinear.search", order=200)
def check_search(ctx: SuiteContext):
    tri = _tri()
    for q_heads, kv_heads, head_dim, page, contexts in _layouts(ctx):
        for dtype in ctx.dtypes():
            for search in ("anchor", "summary"):
                params = _check_params(ctx, search, "gate")
                cache, table = make_cache(ctx, contexts, kv_heads, head_dim, page, dtype, search == "summary")
                meta = make_meta(_step(contexts, 7 if ctx.tiny else 300), table, page, ctx.device)
                q = torch.randn(meta.num_tokens, q_heads, head_dim, generator=ctx.generator(), device=ctx.device,
                                dtype=torch.float32).to(dtype)
                got = _sorted_ranges(tri.select_spans(q, cache, meta, params).ranges.to(torch.int64))
                want = reference_selection(q, cache, meta, params)
                differ = (got != want).flatten(2).any(-1).float().mean().item()
                # near-ties of float32 scores against float64 ones may swap a span now and then
                yield CheckResult("superlinear.search", f"{_tag(dtype)} {search} H{q_heads}/{kv_heads} D{head_dim} "
                                  f"bs{page} ctx{contexts}", differ, 2e-3, differ <= 2e-3,
                                  "fraction of (token, head) whose spans differ")
                del cache


@check("superlinear.attention", order=210)
def check_attention(ctx: SuiteContext):
    tri, sparse_tri = _tri(), _sparse_tri()
    for q_heads, kv_heads, head_dim, page, contexts in _layouts(ctx):
        for dtype in ctx.dtypes():
            cache, table = make_cache(ctx, contexts, kv_heads, head_dim, page, dtype, True)
            for search, combine in MODES:
                params = _check_params(ctx, search, combine)
                for path, chunk in (("split", 1), ("tiled", 5 if ctx.tiny else 300)):
                    meta = make_meta(_step(contexts, chunk), table, page, ctx.device)
                    q = torch.randn(meta.num_tokens, q_heads, head_dim, generator=ctx.generator(),
                                    device=ctx.device, dtype=torch.float32).to(dtype)
                    geom = tri.step_geometry(meta, params, ctx.device)
                    sel = tri.select_spans(q, cache, meta, params, geom)
                    out = torch.full_like(q, float("nan"))
                    sparse_tri.POISON_WORKSPACE = True
                    try:
                        sparse_tri.range_attention(q, cache.k, cache.v, meta, sel.ranges, window_start=geom.sw_start,
                                                   gate_logits=sel.gates, max_range_len=geom.max_span_len,
                                                   max_window_len=geom.max_window_len, path=path, out=out)
                    finally:
                        sparse_tri.POISON_WORKSPACE = False
                    want, _ = sparse_ref.range_attention(q.double(), cache.k.double(), cache.v.double(), meta,
                                                         sel.ranges, window_start=geom.sw_start,
                                                         gate_logits=None if sel.gates is None else sel.gates.double())
                    yield ctx.compare("superlinear.attention", f"{_tag(dtype)} {search}/{combine} {path} "
                                      f"H{q_heads}/{kv_heads} D{head_dim} ctx{contexts}", out, want, dtype)
            del cache


@check("superlinear.end2end", order=220)
def check_end_to_end(ctx: SuiteContext):
    """The whole layer in float32 against the float64 reference (selection included)."""
    from ..kernels.superlinear import paged_reference

    tri = _tri()
    q_heads, kv_heads, head_dim, page, contexts = _layouts(ctx)[0]
    contexts = [min(c, 20_000) for c in contexts]
    cache, table = make_cache(ctx, contexts, kv_heads, head_dim, page, torch.float32, True)
    cache64 = LayerCache(cache.k.double(), cache.v.double(), {n: t.double() for n, t in cache.aux.items()})
    for search, combine in MODES + [("anchor", "union"), ("summary", "gate")]:
        params = _check_params(ctx, search, combine)
        meta = make_meta(_step(contexts, 6 if ctx.tiny else 100), table, page, ctx.device)
        q = torch.randn(meta.num_tokens, q_heads, head_dim, generator=ctx.generator(), device=ctx.device)
        out = torch.full_like(q, float("nan"))
        tri.paged_attention(q, cache, meta, params, out=out)
        want = paged_reference(q.double(), cache64, meta, params)
        yield ctx.compare("superlinear.end2end", f"f32 {search}/{combine} ctx{contexts}", out, want, torch.float32)


@check("superlinear.cuda_graph", order=230)
def check_cuda_graph(ctx: SuiteContext):
    """Decode captured once for a context bucket, replayed after positions and lengths changed on the
    device; and an eager decode step under torch.cuda.set_sync_debug_mode('error')."""
    if not ctx.cuda:
        yield CheckResult("superlinear.cuda_graph", "needs CUDA", float("nan"), 0.0, False, skipped=True)
        return
    from ..kernels.superlinear import paged_reference

    tri = _tri()
    dtype = torch.bfloat16
    q_heads, kv_heads, head_dim, page = 32, 8, 128, 64
    longest = [60_000, 40_000]
    for search, combine in MODES:
        params = make_params(dict(search=search, combine=combine))
        cache, table = make_cache(ctx, longest, kv_heads, head_dim, page, dtype, search == "summary")
        meta = make_meta([(c, 1) for c in longest], table, page, ctx.device)
        q = torch.randn(2, q_heads, head_dim, generator=ctx.generator(), device=ctx.device).to(dtype)
        out = torch.empty_like(q)
        run = lambda: tri.paged_attention(q, cache, meta, params, out=out)  # noqa: E731
        run()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            run()
            synced = ""
        except RuntimeError as e:
            synced = str(e).split("\n")[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        yield CheckResult("superlinear.cuda_graph", f"{search}/{combine} eager decode: no host sync",
                          0.0 if not synced else float("nan"), 0.0, not synced, synced)
        replay = capture_graph(run, ctx.device)
        for lens in ([60_000, 40_000], [5_000, 33_333], [100, 59_999]):
            meta.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))
            meta.positions.copy_(torch.tensor([c - 1 for c in lens], dtype=torch.int64))
            out.fill_(float("nan"))
            replay()
            torch.cuda.synchronize()
            shadow = replace(meta, context_lens_cpu=list(lens))
            cache64 = LayerCache(cache.k.double(), cache.v.double(), {n: t.double() for n, t in cache.aux.items()})
            want = paged_reference(q.double(), cache64, shadow, params)
            del cache64
            yield ctx.compare("superlinear.cuda_graph", f"bf16 {search}/{combine} replay ctx{lens}", out, want, dtype)


@check("superlinear.needle", order=240)
def check_needle(ctx: SuiteContext):
    """One key planted along the query of one KV group's heads, at a random position of a long context:
    summary search must select a span holding it, and the output must be (nearly) its value."""
    tri = _tri()
    q_heads, kv_heads, head_dim, page = (4, 2, 16, 16) if ctx.tiny else (32, 8, 128, 64)
    context = 5000 if ctx.tiny else (256 * K if ctx.quick else 1 * M)
    # one planted key among random ones: what the Quest bound guarantees to find (a block's mean dilutes it)
    params = make_params({**BACKEND_DEFAULTS, "sw_index": 3 if ctx.tiny else 63, "score": "bound", "sink_tokens": 0})
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    cache, table = make_cache(ctx, [context], kv_heads, head_dim, page, dtype, False)
    g = ctx.generator()
    group = q_heads // kv_heads
    found = 0
    trials = 4 if ctx.tiny else 8
    for trial in range(trials):
        pos = int(torch.randint(0, context - params.window - 1, (1,), generator=g, device=ctx.device))
        q = torch.randn(1, q_heads, head_dim, generator=g, device=ctx.device).to(dtype)
        h = trial % kv_heads
        blk, off = int(table[0, pos // page]), pos % page
        saved = cache.k[blk, h, off].clone()
        direction = q[0, h * group].float()
        cache.k[blk, h, off] = (direction * (80.0 / direction.dot(direction))).to(dtype)  # q . k = 80
        cache.aux["kmin"] = cache.k.amin(2)
        cache.aux["kmax"] = cache.k.amax(2)
        meta = make_meta([(context, 1)], table, page, ctx.device)
        out = tri.paged_attention(q, cache, meta, params)
        sel = tri.select_spans(q, cache, meta, params)
        r = sel.ranges[0, h * group]
        hit = bool(((r[:, 0] <= pos) & (pos < r[:, 1])).any())
        err = relative_error(out[0, h * group], cache.v[blk, h, off])
        found += hit and err < 0.05
        cache.k[blk, h, off] = saved
    yield CheckResult("superlinear.needle", f"summary/union ctx {_tokens(context)} {trials} needles",
                      float(trials - found), 0.0, found == trials, f"{found}/{trials} found and attended")


# -------------------------------------------------------------------------------------------- timings

@timing("superlinear.decode", order=110)
def time_decode(ctx: SuiteContext):
    tri, dense_tri = _tri(), _dense_tri()
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    q_heads, kv_heads, head_dim, page = (32, 8, 128, 64) if not ctx.tiny else (4, 2, 16, 16)
    contexts = [3000] if ctx.tiny else ([1 * M] if ctx.quick else [1 * M, 10 * M])
    for context in contexts:
        label = f"ctx {_tokens(context)}" + (" (tiny)" if ctx.tiny else "")
        need = 2 * context * kv_heads * head_dim * dtype.itemsize * 1.05
        if need > 0.9 * _free_bytes(ctx):
            yield TimingRow("superlinear.decode", label, None, note=f"skipped: needs {need / 2**30:.0f} GiB")
            continue
        if ctx.remaining_s() < 40:
            yield TimingRow("superlinear.decode", label, None, note="skipped: time budget")
            continue
        cache, table = make_cache(ctx, [context], kv_heads, head_dim, page, dtype, True)
        q = torch.randn(1, q_heads, head_dim, generator=ctx.generator(), device=ctx.device).to(dtype)
        dense_meta = make_meta([(context, 1)], table, page, ctx.device)
        dense_out = torch.empty_like(q)
        dense_ms = ctx.time_ms(lambda: dense_tri.paged_attention(q, cache.k, cache.v, dense_meta, out=dense_out),
                               graph=True)
        for search, combine in MODES:
            params = make_params(dict(search=search, combine=combine))
            meta = make_meta([(context, 1)], table, page, ctx.device)
            out = torch.empty_like(q)
            # per layer: the step's geometry (about ten small torch ops) is computed once for all layers
            geom = tri.step_geometry(meta, params, ctx.device)
            ms = ctx.time_ms(lambda: tri.paged_attention(q, cache, meta, params, out=out, geom=geom), graph=True)
            sel = tri.select_spans(q, cache, meta, params, geom)
            attended = (sel.ranges[..., 1] - sel.ranges[..., 0]).clamp_min(0).sum().item() \
                + q_heads * min(params.window, context)
            bytes_moved = 2.0 * attended * head_dim * dtype.itemsize
            if search == "summary":
                bytes_moved += 2.0 * (context // page) * kv_heads * head_dim * dtype.itemsize
            else:
                bytes_moved += kv_heads * geom.max_stripes * head_dim * dtype.itemsize
            ratio = dense_ms / ms if ms else float("nan")
            target = 15 if context <= 1 * M else 60
            yield TimingRow("superlinear.decode", f"{label} {search}/{combine}", ms, baseline="dense triton",
                            baseline_ms=dense_ms, bytes_moved=bytes_moved,
                            note=f"target >= {target}x; {attended / q_heads:.0f} keys per head",
                            extra={"context": context, "search": search, "combine": combine,
                                   "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                   "block_size": page, "keys_per_head": attended / q_heads,
                                   "speedup_vs_dense": ratio})
        del cache, table


def _prefill_once(ctx: SuiteContext, tri, params, prompt: int, chunk: int, q_heads: int, kv_heads: int,
                  head_dim: int, page: int, dtype: torch.dtype, dense: bool = False) -> float:
    """Seconds to push a prompt through one layer chunk by chunk (write, bounds, search, attention)."""
    g = ctx.generator()
    blocks = -(-prompt // page)
    table = torch.randperm(blocks, generator=g, device=ctx.device).view(1, blocks).to(torch.int32)
    shape = (blocks, kv_heads, page, head_dim)
    cache = LayerCache(torch.empty(shape, dtype=dtype, device=ctx.device), torch.empty(shape, dtype=dtype, device=ctx.device))
    if not dense:
        for name in ref.summary_table_names(params):
            cache.aux[name] = torch.empty(blocks, kv_heads, head_dim, dtype=dtype, device=ctx.device)
    chunks = []
    for start in range(0, prompt, chunk):
        n = min(chunk, prompt - start)
        pos = torch.arange(start, start + n, device=ctx.device)
        slots = table[0, pos // page].long() * page + pos % page
        meta = make_meta([(start + n, n)], table, page, ctx.device, slot_mapping=slots)
        q = torch.randn(n, q_heads, head_dim, generator=g, device=ctx.device).to(dtype)
        k = torch.randn(n, kv_heads, head_dim, generator=g, device=ctx.device).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=g, device=ctx.device).to(dtype)
        chunks.append((meta, q, k, v))
    dense_tri = _dense_tri()
    ctx.synchronize()
    t0 = time.perf_counter()
    for meta, q, k, v in chunks:
        if dense:
            dense_tri.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
            dense_tri.paged_attention(q, cache.k, cache.v, meta)
        else:
            tri.paged_forward(q, k, v, cache, meta, params)
    ctx.synchronize()
    return time.perf_counter() - t0


@timing("superlinear.prefill", order=120)
def time_prefill(ctx: SuiteContext):
    tri = _tri()
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    q_heads, kv_heads, head_dim, page = (32, 8, 128, 64) if not ctx.tiny else (4, 2, 16, 16)
    chunk = 16 * K if not ctx.tiny else 80
    prompt = 1 * M if not (ctx.tiny or ctx.quick) else (256 * K if ctx.quick and not ctx.tiny else 150)
    if ctx.cuda:  # compile every kernel variant first, on a short prompt
        for search, combine in MODES:
            _prefill_once(ctx, tri, make_params(dict(search=search, combine=combine)), 2 * chunk + 100, chunk,
                          q_heads, kv_heads, head_dim, page, dtype)
    for search, combine in MODES:
        params = make_params(dict(search=search, combine=combine))
        label = f"{_tokens(prompt)} prompt {search}/{combine}" + (" (tiny)" if ctx.tiny else "")
        if ctx.remaining_s() < 60:
            yield TimingRow("superlinear.prefill", label, None, note="skipped: time budget")
            continue
        seconds = _prefill_once(ctx, tri, params, prompt, chunk, q_heads, kv_heads, head_dim, page, dtype)
        yield TimingRow("superlinear.prefill", label, seconds * 1e3,
                        note=f"{prompt / seconds:.0f} tok/s, {_tokens(chunk)} chunks (target <= 2 s at 1M)",
                        extra={"prompt": prompt, "chunk": chunk, "tokens_per_s": prompt / seconds,
                               "search": search, "combine": combine})
    if not ctx.tiny and ctx.remaining_s() > 60:  # dense chunked prefill for scale (1M would take minutes)
        small = 128 * K
        _prefill_once(ctx, tri, make_params({}), 2 * chunk, chunk, q_heads, kv_heads, head_dim, page, dtype, dense=True)
        dense_s = _prefill_once(ctx, tri, make_params({}), small, chunk, q_heads, kv_heads, head_dim, page, dtype,
                                dense=True)
        ours_s = _prefill_once(ctx, tri, make_params(dict(search="summary", combine="union")), small, chunk,
                               q_heads, kv_heads, head_dim, page, dtype)
        yield TimingRow("superlinear.prefill", f"128K prompt summary/union", ours_s * 1e3, baseline="dense triton",
                        baseline_ms=dense_s * 1e3, note=f"{small / ours_s:.0f} tok/s vs dense {small / dense_s:.0f} tok/s")


# --------------------------------------------------------------------- compiled code (bench/kernel_report.py)

def _kernel_report_calls(dtype: torch.dtype) -> None:
    """Representative launches of every superlinear kernel for `python -m longserve.bench.kernel_report`
    (compiled for sm_90 without a GPU): Hq 32 / Hkv 8 / D 128, 64- and 16-token blocks, decode (split-K)
    and a prefill chunk (tiled), anchor/gate and summary/union, and the engine backend's defaults (summary/union,
    mean score, sinks, block-aligned spans)."""
    from ..kernels.triton import superlinear as tri

    q_heads, kv_heads, head_dim = 32, 8, 128
    for page in (64, 16):
        blocks = 4096 // page * 2
        cache = LayerCache(torch.empty(blocks, kv_heads, page, head_dim, dtype=dtype),
                           torch.empty(blocks, kv_heads, page, head_dim, dtype=dtype),
                           {name: torch.empty(blocks, kv_heads, head_dim, dtype=dtype)
                            for name in ("kmin", "kmax", "kmean")})
        table = torch.arange(blocks, dtype=torch.int32).view(2, -1)
        for query_len in ((1, 512) if page == 64 else (1,)):
            seqs = [(4096 - 7, query_len), (4096 - 100, query_len)]
            meta = make_meta(seqs, table, page, torch.device("cpu"),
                             slot_mapping=torch.zeros(2 * query_len, dtype=torch.int64))
            q = torch.empty(meta.num_tokens, q_heads, head_dim, dtype=dtype)
            k = torch.empty(meta.num_tokens, kv_heads, head_dim, dtype=dtype)
            for params in [make_params(dict(sw_index=15, search=search, combine=combine)) for search, combine in MODES]:
                tri.paged_forward(q, k, k.clone(), cache, meta, params)  # window 255
            tri.paged_forward(q, k, k.clone(), cache, meta, backend_params({"sw_index": 15}))


try:
    from .kernel_report import register as _register_report

    _register_report("superlinear", _kernel_report_calls,
                     ["longserve.kernels.triton.superlinear", "longserve.kernels.triton.block_summaries", "longserve.kernels.triton.sparse",
                      "longserve.kernels.triton.dense"])
except ImportError:  # the report module is optional for the suite
    pass
