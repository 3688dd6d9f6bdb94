"""GPU suite rows for HyLRA (bench/gpu_suite.py): kernel checks against float64 references, and decode per
layer at 1M tokens for COMPUTE (summary update + scoring + top-k + attention) and REUSE (attention over the
handed-over blocks) layers against dense Triton decode.
"""

from __future__ import annotations

import torch

from longserve.kernels.base import AttentionMetadata, LayerCache, StepState
from longserve.kernels.plan import AttentionPlan, LayerPlan
from longserve.kernels.reference import block_summaries as ref_summaries
from longserve.kernels.reference import hylra as ref
from longserve.kernels.reference.dense import write_kv

from .gpu_suite import CheckResult, SuiteContext, TimingRow, check, timing


# ------------------------------------------------------------------------------------------- inputs
def paged_case(ctx: SuiteContext, dtype: torch.dtype, seqs: list[tuple[int, int]], hq: int, hkv: int, d: int,
               bs: int):
    """A paged cache holding every sequence's past (summaries computed), plus the step's q/k/v and metadata.
    seqs = [(context_len, query_len)]."""
    g = ctx.generator()
    dev = ctx.device
    blocks_per_seq = [-(-c // bs) for c, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, generator=g, device=dev).to(torch.int32)
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device=dev)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = perm[used:used + nb]
        used += nb
    shape = (num_blocks, hkv, bs, d)
    cache = LayerCache(torch.randn(shape, generator=g, device=dev, dtype=dtype),
                       torch.randn(shape, generator=g, device=dev, dtype=dtype),
                       {"kmin": torch.empty(num_blocks, hkv, d, device=dev, dtype=dtype),
                        "kmax": torch.empty(num_blocks, hkv, d, device=dev, dtype=dtype),
                        "kmean": torch.empty(num_blocks, hkv, d, device=dev, dtype=dtype)})
    # Random keys fill every slot, so the summaries of the (past) blocks are over the whole block; the step's
    # own blocks are recomputed by the kernel under test over their filled part.
    cache.aux["kmin"].copy_(cache.k.amin(dim=2))
    cache.aux["kmax"].copy_(cache.k.amax(dim=2))
    cache.aux["kmean"].copy_(cache.k.float().mean(dim=2))
    positions, slots, qlens, ctxs = [], [], [], []
    for s, (c, n) in enumerate(seqs):
        pos = torch.arange(c - n, c, device=dev)
        positions.append(pos)
        slots.append(tables[s, pos // bs].long() * bs + pos % bs)
        qlens.append(n)
        ctxs.append(c)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    t = starts[-1]
    meta = AttentionMetadata(positions=torch.cat(positions), slot_mapping=torch.cat(slots), block_tables=tables,
                             context_lens=torch.tensor(ctxs, dtype=torch.int32, device=dev),
                             query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev), block_size=bs,
                             context_lens_cpu=ctxs, query_lens_cpu=qlens, seq_ids=list(range(len(seqs))))
    q = torch.randn(t, hq, d, generator=g, device=dev, dtype=dtype)
    k = torch.randn(t, hkv, d, generator=g, device=dev, dtype=dtype)
    v = torch.randn(t, hkv, d, generator=g, device=dev, dtype=dtype)
    return cache, meta, q, k, v


def restricted_reference_f64(q, cache, meta, selection) -> torch.Tensor:
    """Float64 attention of each query over its tile's selected blocks (causal), as an independent oracle."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    hq, d = q.shape[1], q.shape[2]
    hkv, bs = cache.k.shape[1], cache.k.shape[2]
    for ti, tile in enumerate(selection.tiles):
        blocks = selection.blocks[ti].long()  # [num_sel, K]
        num_sel = blocks.shape[0]
        kv_head = torch.arange(num_sel, device=q.device) // (num_sel // hkv)
        ok_block = blocks >= 0
        logical = blocks.clamp_min(0)
        phys = meta.block_tables[tile.seq].long()[logical]
        k = cache.k[phys, kv_head[:, None]].double().reshape(num_sel, -1, d)
        v = cache.v[phys, kv_head[:, None]].double().reshape(num_sel, -1, d)
        key_pos = (logical[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(num_sel, -1)
        key_ok = ok_block[:, :, None].expand(-1, -1, bs).reshape(num_sel, -1) & (
            key_pos < meta.context_lens_cpu[tile.seq])
        qs = q[tile.q_start:tile.q_end].double().transpose(0, 1)  # [Hq, M, D]
        qpos = meta.positions[tile.q_start:tile.q_end]
        rep = hq // num_sel
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        mask = (key_ok[:, None, :] & (key_pos[:, None, :] <= qpos[None, :, None])).repeat_interleave(rep, 0)
        scores = torch.bmm(qs, k.transpose(1, 2)) * d ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[tile.q_start:tile.q_end] = torch.bmm(probs, v).transpose(0, 1)
    return out


def _shapes(ctx: SuiteContext):
    """(hq, hkv, d, bs, decode contexts, prefill (context, chunk))."""
    if ctx.tiny:
        return 4, 2, 32, 16, [200, 97], (300, 40)
    if ctx.quick:
        return 32, 8, 128, 64, [32768, 9000, 70001, 5000], (40000, 1024)
    return 32, 8, 128, 64, [131072, 9000, 70001, 5000], (131072, 2048)


def _params(ctx: SuiteContext, per_head: bool = False, head_reduce: str = "sum", score: str = "mean") -> dict:
    return dict(topk_tokens=64 if ctx.tiny else 2048, sink_blocks=1, recent_blocks=2 if ctx.tiny else 4,
                per_head=per_head, head_reduce=head_reduce, prefill_tile=16 if ctx.tiny else 64, score=score)


# ------------------------------------------------------------------------------------------- checks
@check("hylra.bounds", order=60)
def check_bounds(ctx: SuiteContext):
    from longserve.kernels.triton import block_summaries as tri_summaries
    from longserve.kernels.triton import hylra as tri
    hq, hkv, d, bs, dec, (pctx, chunk) = _shapes(ctx)
    for dtype in ctx.dtypes():
        cache, meta, q, k, v = paged_case(ctx, dtype, [(c, 1) for c in dec] + [(pctx, chunk)], hq, hkv, d, bs)
        write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        want = {name: table.clone() for name, table in cache.aux.items()}
        ref_summaries.update_block_summaries(cache.k, want, meta.slot_mapping)
        touched = torch.div(meta.slot_mapping, bs, rounding_mode="floor").unique()
        for table in cache.aux.values():
            table[touched] = float("nan")
        tri_summaries.update_block_summaries(cache.k, cache.aux, meta.slot_mapping)
        case = f"{str(dtype)[6:]} {len(dec)} decode + chunk {chunk}"
        got = torch.stack([cache.aux["kmin"], cache.aux["kmax"]])
        yield ctx.compare("hylra.bounds", "min/max " + case, got, torch.stack([want["kmin"], want["kmax"]]), dtype,
                          tolerance=0.0)
        # The mean sums in another order; one rounding of the cache dtype apart at most.
        yield ctx.compare("hylra.bounds", "mean " + case, cache.aux["kmean"], want["kmean"], dtype)


@check("hylra.select", order=61)
def check_select(ctx: SuiteContext):
    from longserve.kernels.triton import block_summaries as tri_summaries
    from longserve.kernels.triton import hylra as tri
    hq, hkv, d, bs, dec, (pctx, chunk) = _shapes(ctx)
    for dtype in ctx.dtypes():
        for per_head, reduce, score in ((False, "sum", "mean"), (True, "sum", "mean"), (False, "max", "bound"),
                                        (True, "max", "bound")):
            cache, meta, q, k, v = paged_case(ctx, dtype, [(c, 1) for c in dec] + [(pctx, chunk)], hq, hkv, d, bs)
            params = _params(ctx, per_head, reduce, score)
            want = ref.select(q, cache.aux, meta, **params)
            got = tri.select(q, cache.aux, meta, **params)
            a, b = got.blocks.long(), want.blocks.long()
            width = max(a.shape[-1], b.shape[-1])
            a = torch.nn.functional.pad(a, (0, width - a.shape[-1]), value=-1)
            b = torch.nn.functional.pad(b, (0, width - b.shape[-1]), value=-1)
            # Share of selected blocks that differ (near-ties of the bound may swap under other rounding).
            differ = float((a != b).float().sum() / (b >= 0).sum().clamp_min(1))
            yield CheckResult("hylra.select", f"{str(dtype)[6:]} {score} {'per-head' if per_head else reduce}", differ,
                              0.01, differ <= 0.01, f"{int((b >= 0).sum())} selected blocks")


@check("hylra.attend", order=62)
def check_attend(ctx: SuiteContext):
    from longserve.kernels.triton import block_summaries as tri_summaries
    from longserve.kernels.triton import hylra as tri
    hq, hkv, d, bs, dec, (pctx, chunk) = _shapes(ctx)
    for dtype in ctx.dtypes():
        for per_head in (False, True):
            for label, seqs in (("decode", [(c, 1) for c in dec]), (f"prefill chunk {chunk}", [(pctx, chunk)])):
                cache, meta, q, k, v = paged_case(ctx, dtype, seqs, hq, hkv, d, bs)
                sel = tri.select(q, cache.aux, meta, **_params(ctx, per_head))
                out = torch.full_like(q, float("nan"))
                tri.attend(q, cache.k, cache.v, meta, sel, out=out)
                want = restricted_reference_f64(q, cache, meta, sel)
                yield ctx.compare("hylra.attend", f"{str(dtype)[6:]} {label}{' per-head' if per_head else ''}",
                                  out, want, dtype)


@check("hylra.nosync", order=63)
def check_decode_never_syncs(ctx: SuiteContext):
    """A COMPUTE and a REUSE decode layer run under torch's sync debug mode 'error': any host sync raises."""
    from longserve.kernels.hylra import HyLRABackend
    if not ctx.cuda:
        yield CheckResult("hylra.nosync", "needs CUDA", 0.0, 0.0, True, skipped=True)
        return
    hq, hkv, d, bs, dec, _ = _shapes(ctx)
    dtype = torch.bfloat16
    cache, meta, q, k, v = paged_case(ctx, dtype, [(c, 1) for c in dec], hq, hkv, d, bs)
    cache2 = LayerCache(cache.k.clone(), cache.v.clone(), {n: a.clone() for n, a in cache.aux.items()})
    plan = AttentionPlan("hylra", [LayerPlan("compute"), LayerPlan("reuse", 0)], _params(ctx))
    backend = HyLRABackend(plan, impl="triton")
    state = StepState()
    backend.forward(0, q, k, v, cache, meta, state)  # compile outside the check
    backend.forward(1, q, k, v, cache2, meta, state)
    torch.cuda.synchronize()
    state = StepState()
    detail = ""
    try:
        torch.cuda.set_sync_debug_mode("error")
        backend.forward(0, q, k, v, cache, meta, state)
        backend.forward(1, q, k, v, cache2, meta, state)
        ok = True
    except RuntimeError as e:
        ok, detail = False, " ".join(str(e).split())[:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    yield CheckResult("hylra.nosync", f"bf16 decode batch {len(dec)} compute + reuse", 0.0 if ok else float("nan"),
                      0.0, ok, detail)


# ------------------------------------------------------------------------------------------- timings
@timing("hylra.decode", order=40)
def time_decode(ctx: SuiteContext):
    """Decode per layer, one sequence: dense Triton decode vs HyLRA COMPUTE (summary update for the new token,
    block scoring, top-k, attention over the selection) and REUSE (attention over a handed-over selection)."""
    from longserve.kernels.triton import dense as tri_dense
    from longserve.kernels.triton import block_summaries as tri_summaries
    from longserve.kernels.triton import hylra as tri
    if ctx.tiny:
        hq, hkv, d, bs, contexts, topk = 4, 2, 32, 16, [512], 64
    else:
        hq, hkv, d, bs, topk = 32, 8, 128, 64, 2048
        contexts = [131072, 1 << 20] if ctx.quick else [131072, 1 << 20, 4 << 20]
    dtype = torch.bfloat16 if ctx.cuda else torch.float16
    params = dict(topk_tokens=topk, sink_blocks=1, recent_blocks=4, per_head=False, head_reduce="sum",
                  prefill_tile=64, score="mean")
    elem = torch.tensor([], dtype=dtype).element_size()
    for n in contexts:
        kv_bytes = 2 * n * hkv * d * elem
        if ctx.cuda:
            free = torch.cuda.mem_get_info(ctx.device)[0]
            if kv_bytes * 1.15 > free:
                yield TimingRow("hylra.decode", f"{n // 1024}K tokens", None, note="skipped: KV cache does not fit")
                continue
        if ctx.remaining_s() < 25:
            yield TimingRow("hylra.decode", f"{n // 1024}K tokens", None, note="skipped: out of budget")
            continue
        cache, meta, q, k, v = paged_case(ctx, dtype, [(n, 1)], hq, hkv, d, bs)
        tri_dense.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        del cache.aux["kmin"], cache.aux["kmax"]  # score "mean" keeps only the mean table
        sel = tri.select(q, cache.aux, meta, **params)
        out = torch.empty_like(q)

        def dense():
            tri_dense.paged_attention(q, cache.k, cache.v, meta, out=out)

        def compute():
            tri_summaries.update_block_summaries(cache.k, cache.aux, meta.slot_mapping)
            s = tri.select(q, cache.aux, meta, **params)
            tri.attend(q, cache.k, cache.v, meta, s, out=out)

        def reuse():
            tri.attend(q, cache.k, cache.v, meta, sel, out=out)

        dense_ms = ctx.time_ms(dense, graph=ctx.cuda)
        compute_ms = ctx.time_ms(compute, graph=ctx.cuda)
        reuse_ms = ctx.time_ms(reuse, graph=ctx.cuda)
        nb = -(-n // bs)
        selected = int((sel.blocks >= 0).sum(-1).max())
        sel_bytes = 2 * selected * bs * hkv * d * elem
        summary_bytes = nb * hkv * d * elem
        label = f"{n // 1024}K tok bf16 Hq{hq}/Hkv{hkv}" if ctx.cuda else f"{n} tok (interpreter)"
        yield TimingRow("hylra.decode", f"compute {label}", compute_ms, "dense triton", dense_ms,
                        bytes_moved=summary_bytes + sel_bytes,
                        note=f"{selected} of {nb} blocks (topk {topk})")
        yield TimingRow("hylra.decode", f"reuse {label}", reuse_ms, "dense triton", dense_ms, bytes_moved=sel_bytes,
                        note=f"{selected} of {nb} blocks")
        del cache, q, k, v, out, sel
        if ctx.cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- AOT compile report
def _hylra_calls(dtype: torch.dtype) -> None:
    """The HyLRA wrappers at serving shapes (Hq 32 / Hkv 8 / D 128, 64-token blocks; and D 64 with groups of 3
    as in SmolLM2), decode and a prefill chunk, shared and per-head selection: for bench/kernel_report.py."""
    from longserve.kernels.triton import block_summaries as tri_summaries
    from longserve.kernels.triton import hylra as tri

    for hq, hkv, d, bs in ((32, 8, 128, 64), (9, 3, 64, 64)):
        for seqs in ([(100_000, 1), (5000, 1)], [(20_000, 512)]):
            nb = sum(-(-c // bs) for c, _ in seqs) + 1
            cache = LayerCache(torch.empty(nb, hkv, bs, d, dtype=dtype), torch.empty(nb, hkv, bs, d, dtype=dtype),
                               {"kmin": torch.empty(nb, hkv, d, dtype=dtype),
                                "kmax": torch.empty(nb, hkv, d, dtype=dtype),
                                "kmean": torch.empty(nb, hkv, d, dtype=dtype)})
            t = sum(n for _, n in seqs)
            width = max(-(-c // bs) for c, _ in seqs)
            meta = AttentionMetadata(
                positions=torch.zeros(t, dtype=torch.long), slot_mapping=torch.zeros(t, dtype=torch.long),
                block_tables=torch.zeros(len(seqs), width, dtype=torch.int32),
                context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
                query_start_loc=torch.tensor([0] + [sum(n for _, n in seqs[:i + 1]) for i in range(len(seqs))],
                                             dtype=torch.int32),
                block_size=bs, context_lens_cpu=[c for c, _ in seqs], query_lens_cpu=[n for _, n in seqs])
            q = torch.empty(t, hq, d, dtype=dtype)
            tri_summaries.update_block_summaries(cache.k, cache.aux, meta.slot_mapping)
            for per_head, score in ((False, "mean"), (True, "mean"), (False, "bound")):
                sel = tri.select(q, cache.aux, meta, topk_tokens=2048, sink_blocks=1, recent_blocks=4,
                                 per_head=per_head, head_reduce="sum", prefill_tile=64, score=score)
                tri.attend(q, cache.k, cache.v, meta, sel)


try:
    from .kernel_report import register

    register("hylra", _hylra_calls, ["longserve.kernels.triton.hylra", "longserve.kernels.triton.block_summaries"])
except ImportError:  # the report is optional
    pass
