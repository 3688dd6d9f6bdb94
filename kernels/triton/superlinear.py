"""Triton kernels for superlinear span attention over the paged cache (decode and chunked prefill).

Same semantics as kernels/reference/superlinear.py (docs/superlinear.md). One layer's step is:

  write_kv (kernels/triton/dense.py)          new K/V into the cache
  _update_bounds_kernel      (summary only)   per-block key min/max of the blocks this step wrote
  step geometry (torch, once per step)        t, stripes to search, window start, span reaches (float64)
  _block_bounds_kernel       (summary only)   Quest bound of q . k for every visible key block
  _stripe_topk_kernel                         score the stripes (anchor key, or max bound over the span's
                                              blocks), keep the top-k of each split of the stripes
  _select_kernel                              merge the splits' top-k, build the spans as key ranges
                                              (union: clipped disjoint), gate logits
  sparse range attention (kernels/triton/sparse.py)   spans + window, online softmax, LSE merge / gates

No host synchronisation anywhere: grids and loop bounds come from host integers (token count, heads,
bounds derived from meta.max_context_len rounded up to a power of two) and from device tensors; the
decode path is a fixed sequence of kernels that a CUDA graph can capture for a context-length bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..base import AttentionMetadata, LayerCache
from ..reference import superlinear as ref
from ..reference.superlinear import SpanParams
from . import dense as dense_tri
from . import sparse
from .block_summaries import update_block_summaries
from .common import cdiv, check_same_device, interpreting, next_power_of_2

_BLOCK_STRIPES = 64  # stripes scored per iteration
_SPLIT_STRIPES = 256  # stripes per search program in decode (several programs per token and head)
_BLOCKS_PER_PROGRAM = 64  # key blocks bounded per program (summary search)
_MAX_BOUND_SCRATCH = 1 << 26  # float32 elements of the [tokens, Hq, blocks] bound scratch (256 MB)


# ------------------------------------------------------------------------------------------ geometry

@dataclass
class StepGeometry:
    """Per step token (device tensors) and host bounds shared by every superlinear layer of the step."""

    token_seq: torch.Tensor  # [T] int32 sequence index
    num_stripes: torch.Tensor  # [T] int32 stripes to search (s = first .. first + n - 1)
    sw_start: torch.Tensor  # [T] int64 first key of the window (0 when no stripe: plain causal)
    back: torch.Tensor  # [T] int64 ceil(b t^ps)
    fwd: torch.Tensor  # [T] int64 ceil(f t^ps)
    offsets: torch.Tensor  # [n] int64 off(s) = floor(s^(1/p)) for s = 0 .. n-1
    max_stripes: int  # host bound on num_stripes
    max_span_len: int  # host bound on a span's key count
    max_window_len: int  # host bound on the window's key count
    max_blocks: int  # host bound on a sequence's key blocks


_TABLES: dict[tuple[float, int, str], torch.Tensor] = {}


def positions_capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _device_table(search_power: float, bucket: int, device: torch.device) -> torch.Tensor:
    """The stripe table on the device, built once per (power, length bucket): a decode step (and a CUDA
    graph capturing it) then copies nothing from the host."""
    key = (float(search_power), bucket, str(device))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = ref.stripe_table(search_power, bucket, device)
    return table


def step_geometry(meta: AttentionMetadata, params: SpanParams, device: torch.device) -> StepGeometry:
    """Computed once per step and kept on the metadata object (every layer of a step sees the same one).

    While a CUDA graph is being captured only a geometry computed inside the capture is reused, so the
    graph recomputes it on every replay (a warm-up before the capture must not leave a stale one)."""
    capturing = positions_capturing(meta.positions)
    key = (params, meta.positions.data_ptr(), meta.positions._version, meta.num_tokens, meta.max_context_len,
           capturing)
    cached = getattr(meta, "_superlinear_geometry", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    bucket = ref._bucket(max(meta.max_context_len, 1))
    table = _device_table(params.search_power, bucket, device)
    pos = meta.positions.to(torch.int64)
    t = pos + 1
    n = torch.searchsorted(table, t, right=True) - 1 - params.sw_index  # stripes with off(s) <= t
    n = n.clamp_min(0)
    sw_start = torch.where(n > 0, (pos - params.window + 1).clamp_min(0), torch.zeros_like(pos))
    bucket_t = torch.tensor([bucket])
    max_back = int(ref.span_reach(bucket_t, params.span_power, params.backward_factor))
    max_fwd = int(ref.span_reach(bucket_t, params.span_power, params.forward_factor))
    geom = StepGeometry(
        token_seq=sparse.token_sequences(meta), num_stripes=n.to(torch.int32), sw_start=sw_start,
        back=ref.span_reach(t, params.span_power, params.backward_factor),
        fwd=ref.span_reach(t, params.span_power, params.forward_factor),
        offsets=table, max_stripes=max(1, ref.num_valid_stripes(bucket, params)),
        max_span_len=max(max_back + max_fwd + 1, params.sink_tokens), max_window_len=min(params.window + 1, bucket),
        max_blocks=0)
    meta._superlinear_geometry = (key, geom)  # type: ignore[attr-defined]
    return geom


# -------------------------------------------------------------------------------------------- search

@triton.jit
def _load_group_queries(QS, token, kv_head, s_qt, s_qh, G: tl.constexpr, G_PAD: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The GQA group's search queries of one token as a [G_PAD, BLOCK_D] tile (padding rows 0)."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * G + g
    return tl.load(QS + token * s_qt + heads[:, None] * s_qh + d[None, :],
                   mask=(g[:, None] < G) & (d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation: exact float32 products when IEEE (float32 data, or the CPU
    interpreter), else tensor cores on the data's own 16-bit type."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _block_bounds_kernel(QS, KMIN, KMAX, UB, positions, token_seq, block_tables, token0,
                         s_qt, s_qh, s_mb, s_mh, s_xb, s_xh, s_ut, s_uh, s_bt,
                         G: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr, BB: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """UB[token, head, j] = relu(q) . kmax_j + min(q, 0) . kmin_j: the Quest upper bound of q . k over the
    j-th key block of the token's sequence, for the GQA group's heads at once (one read of the bounds)."""
    local = tl.program_id(0).to(tl.int64)
    token = token0 + local
    kv_head = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2) * BB + tl.arange(0, BB)
    position = tl.load(positions + token).to(tl.int64)
    visible = j < (position // PAGE + 1)
    if tl.program_id(2) * BB <= position // PAGE:
        seq = tl.load(token_seq + token).to(tl.int64)
        block = tl.load(block_tables + seq * s_bt + j, mask=visible, other=0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        m2 = visible[:, None] & (d[None, :] < HEAD_DIM)
        lo = tl.load(KMIN + block[:, None] * s_mb + kv_head * s_mh + d[None, :], mask=m2, other=0.0)
        hi = tl.load(KMAX + block[:, None] * s_xb + kv_head * s_xh + d[None, :], mask=m2, other=0.0)
        q = _load_group_queries(QS, token, kv_head, s_qt, s_qh, G, G_PAD, HEAD_DIM, BLOCK_D)
        ub = _dot(tl.maximum(q, 0.0).to(q.dtype), tl.trans(hi), IEEE) \
            + _dot(tl.minimum(q, 0.0).to(q.dtype), tl.trans(lo), IEEE)  # [G_PAD, BB]
        g = tl.arange(0, G_PAD)
        tl.store(UB + local * s_ut + (kv_head * G + g)[:, None] * s_uh + j[None, :], ub,
                 mask=(g[:, None] < G) & visible[None, :])


@triton.jit
def _stripe_topk_kernel(QS, KC, UB, positions, token_seq, block_tables, num_stripes, sw_start, back, fwd,
                        offsets, CAND_S, CAND_I, CAND_B, token0,
                        s_qt, s_qh, s_kb, s_kh, s_kt, s_ut, s_uh, s_bt, s_ct, s_ch, s_cs,
                        G: tl.constexpr, G_PAD: tl.constexpr, FIRST: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr, SPLIT: tl.constexpr, BS: tl.constexpr, SUMMARY: tl.constexpr,
                        ALIGN: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        IEEE: tl.constexpr):
    """For each query head of one (token, GQA group): the top-k of this split's stripes, ordered by score
    (descending) then stripe (ascending). Scores: q . K[anchor] (anchor search) or the largest block bound
    over the blocks the stripe's span touches (summary search; CAND_B gets that block, the leftmost of the
    score). ALIGN (span_align "block"): one stripe per best block, the smallest."""
    local = tl.program_id(0).to(tl.int64)
    token = token0 + local
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    position = tl.load(positions + token).to(tl.int64)
    t = position + 1
    n_valid = tl.load(num_stripes + token)
    s_lo = FIRST + split * SPLIT
    s_hi = tl.minimum(FIRST + n_valid, s_lo + SPLIT)
    g = tl.arange(0, G_PAD)
    heads = kv_head * G + g
    slot = tl.arange(0, KP)
    lane = tl.arange(0, BS)
    # pad slots (+inf) are never evicted; real slots start empty (-inf, stripe -1)
    best_s = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros([G_PAD, KP], tl.float32)
    best_i = tl.full([G_PAD, KP], -1, tl.int32)
    best_b = tl.full([G_PAD, KP], -1, tl.int32)
    if SUMMARY:
        ws = tl.load(sw_start + token)
        b = tl.load(back + token)
        f = tl.load(fwd + token)
        last_end = tl.minimum(position, ws - 1)
        width = (b + f) // PAGE + 2  # blocks a span can touch
        ub_rows = UB + local * s_ut + heads[:, None] * s_uh  # [G_PAD, 1]
    else:
        seq = tl.load(token_seq + token).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        q = _load_group_queries(QS, token, kv_head, s_qt, s_qh, G, G_PAD, HEAD_DIM, BLOCK_D)
        kbase = KC + kv_head * s_kh
        table = block_tables + seq * s_bt
    for s0 in range(s_lo, s_hi, BS):
        s = s0 + lane
        smask = s < s_hi
        anchor = t - tl.load(offsets + s, mask=smask, other=0)
        if SUMMARY:
            lo = tl.maximum(anchor - b, 0) // PAGE
            hi = tl.minimum(anchor + f, last_end) // PAGE
            scores = tl.full([G_PAD, BS], float("-inf"), tl.float32)
            best_block = tl.zeros([G_PAD, BS], tl.int32)
            for w in range(0, width):
                m = (smask & (lo + w <= hi))[None, :] & (g[:, None] < G)
                val = tl.load(ub_rows + (lo + w)[None, :], mask=m, other=float("-inf"))
                better = val > scores  # strictly: ties keep the leftmost block
                scores = tl.where(better, val, scores)
                best_block = tl.where(better, (lo + w)[None, :].to(tl.int32), best_block)
        else:
            best_block = tl.zeros([G_PAD, BS], tl.int32)  # anchor search scores no blocks
            blk = tl.load(table + anchor // PAGE, mask=smask, other=0).to(tl.int64)
            k = tl.load(kbase + blk[:, None] * s_kb + (anchor % PAGE)[:, None] * s_kt + d[None, :],
                        mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            scores = _dot(q, tl.trans(k), IEEE)  # [G_PAD, BS] raw q . k, no 1/sqrt(d)
        scores = tl.where(smask[None, :], scores, float("-inf"))
        for _ in tl.static_range(K):
            top = tl.max(scores, 1)
            arg = tl.argmax(scores, 1)  # ties: the leftmost, i.e. the smaller stripe
            at_arg = lane[None, :] == arg[:, None]
            top_blk = tl.sum(tl.where(at_arg, best_block, 0), 1)
            worst = tl.min(best_s, 1)
            evict = tl.argmax(tl.where(best_s == worst[:, None], best_i, -2), 1)  # among equals: larger stripe
            fits = top > worst
            if ALIGN:  # a block already kept (by a smaller stripe) is not kept twice
                fits = fits & (tl.max((best_b == top_blk[:, None]).to(tl.int32), 1) == 0)
                at_arg = best_block == top_blk[:, None]  # every stripe of that block leaves the race
            take = slot[None, :] == tl.where(fits, evict, -1)[:, None]
            best_s = tl.where(take, top[:, None], best_s)
            best_i = tl.where(take, (s0 + arg)[:, None], best_i)
            best_b = tl.where(take, top_blk[:, None], best_b)
            scores = tl.where(at_arg, float("-inf"), scores)
    out = local * s_ct + heads[:, None] * s_ch + split * s_cs + slot[None, :]
    keep = (g[:, None] < G) & (slot[None, :] < K)
    tl.store(CAND_S + out, best_s, mask=keep)
    tl.store(CAND_I + out, best_i, mask=keep)
    tl.store(CAND_B + out, best_b, mask=keep)


@triton.jit
def _select_kernel(CAND_S, CAND_I, CAND_B, positions, sw_start, back, fwd, offsets, RANGES, GATES, token0,
                   s_ct, s_ch, s_rt, s_rh, s_rk, s_gt, s_gh,
                   K: tl.constexpr, KP: tl.constexpr, NUM_SPLITS: tl.constexpr, CP: tl.constexpr,
                   UNION: tl.constexpr, SINK: tl.constexpr, ALIGN: tl.constexpr, PAGE: tl.constexpr):
    """Merge the splits' candidates into the top-k stripes and write their spans as [start, end) key ranges
    (union: spans clipped to start after the ones that start earlier, so the ranges are disjoint) and gate
    logits. SINK > 0 (union only): range slot K holds the sinks [0, min(SINK, window start)) and the spans
    start after them. ALIGN: one stripe per best block, its span centred on that block."""
    local = tl.program_id(0).to(tl.int64)
    token = token0 + local
    head = tl.program_id(1)
    c = tl.arange(0, CP)
    cmask = c < NUM_SPLITS * K
    cand = local * s_ct + head * s_ch + c  # [splits, K] contiguous
    sc = tl.load(CAND_S + cand, mask=cmask, other=float("-inf"))
    idx = tl.load(CAND_I + cand, mask=cmask, other=-1)
    blk = tl.load(CAND_B + cand, mask=cmask, other=-1)
    big = 2147483647
    idx = tl.where(sc > float("-inf"), idx, big)
    slot = tl.arange(0, KP)
    sel_s = tl.full([KP], float("-inf"), tl.float32)
    sel_i = tl.full([KP], -1, tl.int32)
    sel_b = tl.full([KP], 0, tl.int32)
    for j in tl.static_range(K):
        top = tl.max(sc, 0)
        pick = tl.min(tl.where(sc == top, idx, big), 0)  # ties: the smaller stripe
        found = top > float("-inf")
        picked = idx == tl.where(found, pick, -2)
        pick_blk = tl.sum(tl.where(picked, blk, 0), 0)
        here = slot == tl.where(found, j, -1)
        sel_s = tl.where(here, top, sel_s)
        sel_i = tl.where(here, pick, sel_i)
        sel_b = tl.where(here, pick_blk, sel_b)
        gone = picked
        if ALIGN:  # other splits' stripes of the same block leave too (once none is left, every idx is big)
            gone = gone | ((blk == pick_blk) & (idx != big))
        sc = tl.where(gone, float("-inf"), sc)
        idx = tl.where(gone, big, idx)
    valid = sel_i >= 0
    position = tl.load(positions + token).to(tl.int64)
    ws = tl.load(sw_start + token)
    b = tl.load(back + token)
    f = tl.load(fwd + token)
    last = tl.minimum(position, ws - 1)
    if ALIGN:  # the span's length, centred on its best block, moved inside [0, last]
        centre = sel_b.to(tl.int64) * PAGE + PAGE // 2
        start = tl.maximum(tl.minimum(centre - (b + f) // 2, last - b - f), 0)
        end = tl.minimum(start + b + f, last) + 1  # exclusive
    else:
        off = tl.load(offsets + tl.where(valid, sel_i, 0), mask=valid, other=0)
        anchor = position + 1 - off
        start = tl.maximum(anchor - b, 0)
        end = tl.minimum(anchor + f, last) + 1  # exclusive
    if UNION:
        # Clip each start to the latest end of the spans that start earlier (equal starts: the lower slot
        # first), so every key is attended once; a span inside earlier ones becomes empty.
        earlier = valid[None, :] & ((start[None, :] < start[:, None])
                                    | ((start[None, :] == start[:, None]) & (slot[None, :] < slot[:, None])))
        prev_end = tl.max(tl.where(earlier, end[None, :], 0), 1)
        start = tl.maximum(start, prev_end)
        end = tl.maximum(end, start)
        if SINK > 0:
            sink_end = tl.minimum(ws, SINK)
            start = tl.maximum(start, sink_end)
            sink_base = RANGES + local * s_rt + head * s_rh + K * s_rk
            tl.store(sink_base, tl.zeros([], tl.int32))
            tl.store(sink_base + 1, sink_end.to(tl.int32))
    start = tl.where(valid, start, 0)
    end = tl.where(valid, end, 0)
    rbase = RANGES + local * s_rt + head * s_rh + slot * s_rk
    tl.store(rbase, start.to(tl.int32), mask=slot < K)
    tl.store(rbase + 1, end.to(tl.int32), mask=slot < K)
    if not UNION:
        tl.store(GATES + local * s_gt + head * s_gh + slot, sel_s, mask=slot < K)


@dataclass
class PagedSelection:
    ranges: torch.Tensor  # [T, Hq, K (+ 1 sink range), 2] int32 [start, end) of each span (union: disjoint)
    gates: torch.Tensor | None  # [T, Hq, K] float32 search scores (-inf: no span), gate mode only
    geometry: StepGeometry


def select_spans(q_search: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, params: SpanParams,
                 geom: StepGeometry | None = None) -> PagedSelection:
    """Span search for every step token and query head over the paged cache (summary search reads aux
    kmin/kmax for score "bound", kmean for score "mean")."""
    tokens, hq, head_dim = q_search.shape
    hkv, page = cache.k.shape[1], cache.k.shape[2]
    device = q_search.device
    geom = geom or step_geometry(meta, params, device)
    k = min(params.num_spans, geom.max_stripes)
    kp = next_power_of_2(k)
    summary = params.search == "summary"
    group = hq // hkv
    g_pad = max(16, next_power_of_2(group))  # tl.dot wants at least 16 rows
    block_d = max(16, next_power_of_2(head_dim))
    ieee = q_search.dtype == torch.float32 or interpreting()
    num_splits = cdiv(geom.max_stripes, _SPLIT_STRIPES) if tokens * hkv < 512 else 1
    split = cdiv(geom.max_stripes, num_splits)
    ranges = torch.empty(tokens, hq, k + (1 if params.sink_tokens else 0), 2, dtype=torch.int32, device=device)
    gates = None if params.combine == "union" else torch.empty(tokens, hq, k, dtype=torch.float32, device=device)
    if tokens == 0:
        return PagedSelection(ranges, gates, geom)
    if q_search.stride(-1) != 1:
        q_search = q_search.contiguous()
    max_blocks = cdiv(max(meta.max_context_len, 1), page)
    # Summary search keeps a [tokens, Hq, blocks] float32 scratch: long prefill chunks go in slices.
    per_slice = max(1, _MAX_BOUND_SCRATCH // (hq * max_blocks)) if summary else tokens
    bt = meta.block_tables
    for t0 in range(0, tokens, per_slice):
        n = min(per_slice, tokens - t0)
        if summary:
            # q . kmean = relu(q) . kmean + min(q, 0) . kmean: the bound kernel with kmean on both sides
            tables = [cache.aux[name] for name in ref.summary_table_names(params)]
            kmin, kmax = tables if params.score == "bound" else tables * 2
            ub = torch.empty(n, hq, max_blocks, dtype=torch.float32, device=device)
            _block_bounds_kernel[(n, hkv, cdiv(max_blocks, _BLOCKS_PER_PROGRAM))](
                q_search, kmin, kmax, ub, meta.positions, geom.token_seq, bt, t0,
                q_search.stride(0), q_search.stride(1), kmin.stride(0), kmin.stride(1), kmax.stride(0),
                kmax.stride(1), ub.stride(0), ub.stride(1), bt.stride(0),
                G=group, G_PAD=g_pad, PAGE=page, BB=_BLOCKS_PER_PROGRAM, HEAD_DIM=head_dim, BLOCK_D=block_d,
                IEEE=ieee, num_warps=4)
        else:
            ub = torch.empty(1, 1, 1, dtype=torch.float32, device=device)  # not read
        cand_s = torch.empty(n, hq, num_splits, k, dtype=torch.float32, device=device)
        cand_i = torch.empty(n, hq, num_splits, k, dtype=torch.int32, device=device)
        cand_b = torch.empty(n, hq, num_splits, k, dtype=torch.int32, device=device)
        align = params.span_align == "block"
        _stripe_topk_kernel[(n, hkv, num_splits)](
            q_search, cache.k, ub, meta.positions, geom.token_seq, bt, geom.num_stripes, geom.sw_start,
            geom.back, geom.fwd, geom.offsets, cand_s, cand_i, cand_b, t0,
            q_search.stride(0), q_search.stride(1), cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
            ub.stride(0), ub.stride(1), bt.stride(0), cand_s.stride(0), cand_s.stride(1), cand_s.stride(2),
            G=group, G_PAD=g_pad, FIRST=params.first_stripe, K=k, KP=kp, SPLIT=split, BS=_BLOCK_STRIPES,
            SUMMARY=summary, ALIGN=align, PAGE=page, HEAD_DIM=head_dim, BLOCK_D=block_d, IEEE=ieee, num_warps=4)
        r = ranges[t0:t0 + n]
        g = gates[t0:t0 + n] if gates is not None else cand_s  # dummy in union mode
        _select_kernel[(n, hq)](
            cand_s, cand_i, cand_b, meta.positions, geom.sw_start, geom.back, geom.fwd, geom.offsets, r, g, t0,
            cand_s.stride(0), cand_s.stride(1), r.stride(0), r.stride(1), r.stride(2), g.stride(0), g.stride(1),
            K=k, KP=kp, NUM_SPLITS=num_splits, CP=next_power_of_2(num_splits * k),
            UNION=params.combine == "union", SINK=params.sink_tokens, ALIGN=align, PAGE=page, num_warps=1)
    return PagedSelection(ranges, gates, geom)


# ---------------------------------------------------------------------------------------- attention

def paged_attention(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, params: SpanParams, *,
                    q_search: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    geom: StepGeometry | None = None) -> torch.Tensor:
    """Span attention of every step token over its sequence's paged cache (already written). [T, Hq, D].

    geom: the step's geometry if the caller already has it (default: step_geometry, cached on meta)."""
    check_same_device(q=q, k_cache=cache.k, v_cache=cache.v, positions=meta.positions)
    geom = geom or step_geometry(meta, params, q.device)
    sel = select_spans(q if q_search is None else q_search, cache, meta, params, geom)
    return paged_attend(q, cache, meta, sel, out=out)


def paged_attend(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, sel: PagedSelection, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every step token over a selection's spans and windows (a REUSE layer attends to its
    source's selection with its own q and cache). [T, Hq, D]."""
    geom = sel.geometry
    result, _ = sparse.range_attention(q, cache.k, cache.v, meta, sel.ranges, window_start=geom.sw_start,
                                       gate_logits=sel.gates, max_range_len=geom.max_span_len,
                                       max_window_len=geom.max_window_len, token_seq=geom.token_seq, out=out)
    return result


def paged_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                  params: SpanParams, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The backend's layer step: cache write, block summaries update (summary search), search, attention."""
    dense_tri.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
    if params.search == "summary":
        update_block_summaries(cache.k, {n: cache.aux[n] for n in ref.summary_table_names(params)}, meta.slot_mapping)
    return paged_attention(q, cache, meta, params, out=out)


def span_attention_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              params: SpanParams, *, q_search: torch.Tensor | None = None,
                              block_size: int = 64) -> torch.Tensor:
    """The functional form on contiguous tensors through the paged kernels: each batch element becomes one
    sequence of a paged cache with block_size-key blocks. Returns [B, Hq, Lq, D]."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nb = cdiv(lk, block_size)
    pad = nb * block_size - lk

    def paged(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(bsz, hkv, nb, block_size, d).permute(0, 2, 1, 3, 4).reshape(bsz * nb, hkv, block_size, d)

    cache = LayerCache(paged(k).contiguous(), paged(v).contiguous())
    if params.search == "summary":
        tables = ref.summary_tables(k.reshape(bsz * hkv, lk, d), params, block_size)
        for name, bound in zip(ref.summary_table_names(params), tables):
            # [B * Hkv, nb, D] -> [B * nb, Hkv, D]: block j of batch element b is physical block b * nb + j
            cache.aux[name] = bound.view(bsz, hkv, nb, d).transpose(1, 2).reshape(bsz * nb, hkv, d).to(k.dtype)
    device = q.device
    tables = torch.arange(bsz * nb, dtype=torch.int32, device=device).view(bsz, nb)
    meta = AttentionMetadata(
        positions=positions.to(device=device, dtype=torch.int64).repeat(bsz),
        slot_mapping=torch.full((bsz * lq,), -1, dtype=torch.int64, device=device),
        block_tables=tables, context_lens=torch.full((bsz,), lk, dtype=torch.int32, device=device),
        query_start_loc=(torch.arange(bsz + 1, device=device) * lq).to(torch.int32), block_size=block_size,
        context_lens_cpu=[lk] * bsz, query_lens_cpu=[lq] * bsz)
    flat = q.permute(0, 2, 1, 3).reshape(bsz * lq, hq, d)
    flat_search = None if q_search is None else q_search.permute(0, 2, 1, 3).reshape(bsz * lq, hq, d)
    out = paged_attention(flat, cache, meta, params, q_search=flat_search)
    return out.view(bsz, lq, hq, d).permute(0, 2, 1, 3)
