"""GPU suite rows for routing attention (bench/gpu_suite.py): the k-means kernels and routed attention against
float64 references, the whole backend against dense, and timings: decode per layer at 128K and 1M tokens
against dense Triton decode, the clustering cost of a prefill (all segments' k-means) and of the online update.
"""

from __future__ import annotations

import torch

from longserve.kernels.base import AttentionMetadata, LayerCache, StepState
from longserve.kernels.plan import AttentionPlan, LayerPlan
from longserve.kernels.reference import routing as ref

from .gpu_suite import CheckResult, SuiteContext, TimingRow, check, timing


# ------------------------------------------------------------------------------------------- inputs
def paged_sequence(ctx: SuiteContext, dtype: torch.dtype, n: int, hkv: int, d: int, bs: int, step: int = 1):
    """One sequence of n keys in a paged cache (scattered blocks); the last `step` tokens are the step's.
    Returns (cache, meta, k, v): the step's k/v are already in the cache."""
    g = ctx.generator()
    dev = ctx.device
    nb = -(-n // bs)
    table = torch.randperm(nb + 1, generator=g, device=dev)[:nb].to(torch.int32)[None]
    shape = (nb + 1, hkv, bs, d)
    cache = LayerCache(torch.randn(shape, generator=g, device=dev, dtype=dtype),
                       torch.randn(shape, generator=g, device=dev, dtype=dtype))
    pos = torch.arange(n - step, n, device=dev)
    slots = table[0, pos // bs].long() * bs + pos % bs
    k = cache.k[slots // bs, :, slots % bs].clone()
    v = cache.v[slots // bs, :, slots % bs].clone()
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=table,
                             context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                             query_start_loc=torch.tensor([0, step], dtype=torch.int32, device=dev), block_size=bs,
                             context_lens_cpu=[n], query_lens_cpu=[step], seq_ids=[0])
    return cache, meta, k, v


def backend(params: dict, impl: str = "triton"):
    from longserve.kernels.routing import RoutingBackend
    return RoutingBackend(AttentionPlan("routing", [LayerPlan("compute")], params), impl=impl)


def attend_reference_f64(q, cache, meta, selection) -> torch.Tensor:
    """Float64 causal attention of each query over its tile's selected positions: an independent oracle."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    hq, d = q.shape[1], q.shape[2]
    hkv, bs = cache.k.shape[1], cache.k.shape[2]
    group = hq // hkv
    for t, tile in enumerate(selection.tiles):
        table = meta.block_tables[tile.seq].long()
        qpos = torch.arange(tile.first_pos, tile.last_pos + 1, device=q.device)
        for h in range(hkv):
            pos = selection.positions(t, h)
            k = cache.k[table[pos // bs], h, pos % bs].double()
            v = cache.v[table[pos // bs], h, pos % bs].double()
            qs = q[tile.q_start:tile.q_start + tile.q_len, h * group:(h + 1) * group].double()  # [M, G, D]
            s = torch.einsum("mgd,nd->mgn", qs, k) * d ** -0.5
            s = s.masked_fill(pos[None, None, :] > qpos[:, None, None], float("-inf"))
            out[tile.q_start:tile.q_start + tile.q_len, h * group:(h + 1) * group] = torch.softmax(s, -1) @ v
    return out


def _shapes(ctx: SuiteContext):
    """(hq, hkv, d, bs, params) for the checks."""
    if ctx.tiny:
        return 4, 2, 32, 16, dict(segment_tokens=128, tokens_per_cluster=8, budget_tokens=40, window=16,
                                  sink_tokens=4, prefill_tile=16)
    return 32, 8, 128, 64, dict(segment_tokens=4096, tokens_per_cluster=64, budget_tokens=2048, window=1024,
                                sink_tokens=16, prefill_tile=64)


# ------------------------------------------------------------------------------------------- checks
@check("routing.kmeans", order=70)
def check_kmeans(ctx: SuiteContext):
    from longserve.kernels.triton import routing as tri
    b, n, c, d = (3, 200, 13, 32) if ctx.tiny else (64, 4096, 64, 128)
    for dtype in ctx.dtypes():
        g = ctx.generator()
        keys = torch.randn(b, n, d, generator=g, device=ctx.device).to(dtype)
        cent = torch.randn(b, c, d, generator=g, device=ctx.device)
        cent = cent / cent.norm(dim=-1, keepdim=True)
        got = tri.assign(keys, cent)
        scores = keys.double() @ cent.double().transpose(1, 2)
        chosen = scores.gather(2, got.long().unsqueeze(-1)).squeeze(-1)
        # The chosen centroid's score against the best one (equal unless a near-tie picked another best).
        yield ctx.compare("routing.assign", f"{str(dtype)[6:]} B{b} N{n} C{c}", chosen, scores.amax(-1), dtype,
                          tolerance=1e-6 if dtype == torch.float32 else 1e-3)
        for decay in (0.0, 0.999):
            new, raw, cnt = tri.update_centroids(keys, got, cent, decay)
            want_new, want_raw, want_cnt = ref.update_centroids(keys.double(), got, cent.double(), decay)
            ok = torch.equal(cnt, want_cnt)
            yield ctx.compare("routing.update", f"{str(dtype)[6:]} sums decay {decay}", raw, want_raw, dtype,
                              tolerance=1e-5)
            res = ctx.compare("routing.update", f"{str(dtype)[6:]} centroids decay {decay}", new, want_new, dtype,
                              tolerance=1e-5)
            yield CheckResult(res.name, res.case, res.error, res.tolerance, res.passed and ok,
                              "" if ok else "counts differ")


@check("routing.attend", order=71)
def check_attend(ctx: SuiteContext):
    """Routed attention (Triton) on a real selection: decode and a prefill chunk, vs float64 over the same keys."""
    from longserve.kernels.triton import routing as tri
    hq, hkv, d, bs, params = _shapes(ctx)
    n = 600 if ctx.tiny else 40000
    for dtype in ctx.dtypes():
        for step in (1, 48 if ctx.tiny else 1024):
            cache, meta, k, v = paged_sequence(ctx, dtype, n, hkv, d, bs, step)
            q = torch.randn(step, hq, d, generator=ctx.generator(), device=ctx.device, dtype=dtype)
            be = backend(params)
            sel = be.select(0, q, cache, meta, ops=tri)
            got = tri.attend(q, cache.k, cache.v, meta.block_tables, sel)
            want = attend_reference_f64(q, cache, meta, sel)
            routed = int(sel.routed_count.max())
            res = ctx.compare("routing.attend", f"{str(dtype)[6:]} step {step} ctx {n}", got, want, dtype)
            yield CheckResult(res.name, res.case, res.error, res.tolerance, res.passed and routed > 0,
                              f"{routed} routed keys" if routed else "nothing routed")


@check("routing.dense", order=72)
def check_covering_budget_is_dense(ctx: SuiteContext):
    """The whole backend (Triton path) with a budget covering everything equals float64 dense attention."""
    from longserve.kernels.reference.dense import gather_kv
    hq, hkv, d, bs, params = _shapes(ctx)
    n = 700 if ctx.tiny else 20000
    for dtype in ctx.dtypes():
        for step in (1, 64):
            cache, meta, k, v = paged_sequence(ctx, dtype, n, hkv, d, bs, step)
            q = torch.randn(step, hq, d, generator=ctx.generator(), device=ctx.device, dtype=dtype)
            be = backend({**params, "budget_tokens": 10 ** 9})
            got = be.forward(0, q, k, v, cache, meta, StepState())
            keys = gather_kv(cache.k, meta.block_tables[0], n).double().repeat_interleave(hq // hkv, 0)
            vals = gather_kv(cache.v, meta.block_tables[0], n).double().repeat_interleave(hq // hkv, 0)
            s = torch.einsum("mhd,hnd->hmn", q.double(), keys) * d ** -0.5
            s = s.masked_fill(torch.arange(n, device=ctx.device)[None, None] > meta.positions[None, :, None],
                              float("-inf"))
            want = torch.einsum("hmn,hnd->mhd", torch.softmax(s, -1), vals)
            yield ctx.compare("routing.dense", f"{str(dtype)[6:]} step {step} ctx {n}", got, want, dtype)


# ------------------------------------------------------------------------------------------- timings
@timing("routing.decode", order=45)
def time_decode(ctx: SuiteContext):
    """Decode per layer, one sequence, steady state (tables up to date: the online update runs once per
    `window` steps and is timed separately): cache write + cluster scoring + selection + routed attention,
    against dense Triton decode. Also: k-means of every segment of the prompt (the clustering cost of a
    prefill) and the online update of one window of keys."""
    from longserve.kernels.triton import dense as tri_dense
    from longserve.kernels.triton import routing as tri
    hq, hkv, d, bs, params = _shapes(ctx)
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    contexts = [700] if ctx.tiny else ([1 << 20] if ctx.quick else [131072, 1 << 20])
    elem = torch.tensor([], dtype=dtype).element_size()
    for n0 in contexts:
        n = n0 + 17  # mid-segment, so repeated decode steps at this context never close a segment
        label = f"{n0 // 1024}K tok bf16 Hq{hq}/Hkv{hkv}" if ctx.cuda else f"{n} tok (interpreter)"
        if ctx.cuda and 2 * n * hkv * d * elem * 1.6 > torch.cuda.mem_get_info(ctx.device)[0]:
            yield TimingRow("routing.decode", label, None, note="skipped: KV cache does not fit")
            continue
        if ctx.remaining_s() < 40:
            yield TimingRow("routing.decode", label, None, note="skipped: out of budget")
            continue
        cache, meta, k, v = paged_sequence(ctx, dtype, n, hkv, d, bs, 1)
        q = torch.randn(1, hq, d, generator=ctx.generator(), device=ctx.device, dtype=dtype)
        be = backend(params)
        p = be.params

        def cluster_prompt():  # every complete segment's k-means + the open segment's online assignment
            t = ref.ClusterTable(hkv, d, p["segment_tokens"], p["clusters_per_segment"], p["sink_tokens"], ctx.device)
            t.catch_up(cache.k, meta.block_tables[0], n - 1, n - 1, p["kmeans_iters"], p["decay"], tri)
            return t

        ctx.synchronize()
        cluster_ms = ctx.time_ms(cluster_prompt, max_reps=3, min_reps=1, target_s=0.1)
        table = cluster_prompt()
        be._tables[0] = {0: table}
        out = torch.empty_like(q)

        def dense():
            tri_dense.paged_attention(q, cache.k, cache.v, meta, out=out)

        def routing():
            be.forward(0, q, k, v, cache, meta, StepState())

        window_keys = min(p["window"], n - 1 - (n - 1) // p["segment_tokens"] * p["segment_tokens"])

        def online_update():  # one window of keys assigned to the live codebook with the EMA update
            keys = torch.randn(hkv, window_keys, d, device=ctx.device, dtype=dtype)
            a = tri.assign(keys, table.live)
            tri.update_centroids(keys, a, table.live, p["decay"])

        dense_ms = ctx.time_ms(dense, graph=ctx.cuda)
        dense_eager_ms = ctx.time_ms(dense)
        routing_ms = ctx.time_ms(routing)
        update_ms = ctx.time_ms(online_update)
        state = StepState()
        be.forward(0, q, k, v, cache, meta, state)
        sel = state.selections[0]
        attended = int(sel.routed_count.max()) + sel.tiles[0].sink_end + sel.tiles[0].last_pos - sel.tiles[0].local_lo + 1
        yield TimingRow("routing.decode", f"decode {label}", routing_ms, "dense triton (CUDA graph)", dense_ms,
                        bytes_moved=2 * attended * hkv * d * elem,
                        note=f"{attended} of {n} keys; dense eager {dense_eager_ms:.3f} ms; no CUDA graph "
                             f"(host-side selection)", extra={"dense_eager_ms": dense_eager_ms})
        yield TimingRow("routing.cluster", f"prefill k-means {label}", cluster_ms,
                        note=f"{table.num_closed} segments x {p['clusters_per_segment']} clusters, "
                             f"{p['kmeans_iters']} Lloyd iters; {cluster_ms / (n / 1024):.3f} ms per 1K tokens; "
                             f"tables {table.nbytes() / 2**20:.0f} MiB")
        yield TimingRow("routing.cluster", f"online update {window_keys} keys {label}", update_ms,
                        note=f"amortised over {p['window']} decode steps: {update_ms / p['window'] * 1e3:.1f} us/step")
        del cache, k, v, q, out, table, be
        if ctx.cuda:
            torch.cuda.empty_cache()
