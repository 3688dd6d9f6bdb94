"""Triton kernels for HyLRA: block scoring (+ torch.topk) and attention over selected blocks (the block-summary
update is block_summaries.py's, shared with superlinear).

Same semantics and signatures as kernels/reference/hylra.py (select, attend). The decode
path never waits for the device: tile descriptors come from the metadata's device tensors, the number of
selected blocks per tile and the top-k width from host-side lengths, and the top-k runs on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import AttentionMetadata
from ..reference.hylra import HyLRASelection, make_tiles, tile_selected_count
from .block_summaries import quest_bound
from .common import check_same_device, next_power_of_2


# ------------------------------------------------------------------------------------ block scoring
@triton.jit
def _score_blocks_kernel(q, kmin, kmax, kmean, block_tables, tile_seq, tile_q_start, tile_q_len, tile_first, tile_last,
                         scores, max_blocks,
                         s_qt, s_qh, s_mb, s_mh, s_bt, s_st, s_sh,
                         BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUP: tl.constexpr, HEADS_PER_SEL: tl.constexpr,
                         SINK: tl.constexpr, RECENT: tl.constexpr, SUM_HEADS: tl.constexpr, IEEE: tl.constexpr,
                         MEAN: tl.constexpr):
    t = tl.program_id(0)
    s = tl.program_id(1)
    chunk = tl.program_id(2)
    seq = tl.load(tile_seq + t)
    q_start = tl.load(tile_q_start + t)
    q_len = tl.load(tile_q_len + t)
    lo = tl.maximum(tl.load(tile_first + t) // BS - (RECENT - 1), 0)
    hi = tl.load(tile_last + t) // BS
    sink_end = tl.minimum(lo, SINK)
    blk = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    forced = (blk < sink_end) | ((blk >= lo) & (blk <= hi))
    candidate = (blk >= sink_end) & (blk < lo)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if (chunk * BLOCK_N < lo) & (chunk * BLOCK_N + BLOCK_N > sink_end):  # some candidate in this chunk
        kv_head = (s * HEADS_PER_SEL) // GROUP
        cols = tl.arange(0, BLOCK_D)
        phys = tl.load(block_tables + seq * s_bt + blk, mask=candidate, other=0)
        kmask = candidate[:, None] & (cols[None, :] < D)
        kptr = phys[:, None] * s_mb + kv_head * s_mh + cols[None, :]
        if MEAN:  # q . mean key: lo_keys holds the means, hi_keys is unused
            lo_keys = tl.load(kmean + kptr, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            hi_keys = lo_keys
        else:
            lo_keys = tl.load(kmin + kptr, mask=kmask, other=0.0).to(tl.float32)
            hi_keys = tl.load(kmax + kptr, mask=kmask, other=0.0).to(tl.float32)
        if SUM_HEADS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        if not IEEE:  # half-precision inputs: tensor-core dots, products exact, float32 sums
            lo_keys = lo_keys.to(q.dtype.element_ty)
            hi_keys = hi_keys.to(q.dtype.element_ty)
        for g in tl.static_range(HEADS_PER_SEL):
            head = s * HEADS_PER_SEL + g
            best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
            for m0 in range(0, q_len, BLOCK_M):  # the tile's queries, BLOCK_M rows at a time (few registers)
                rows = m0 + tl.arange(0, BLOCK_M)
                qptr = q + (q_start + rows[:, None]) * s_qt + head * s_qh + cols[None, :]
                qv = tl.load(qptr, mask=(rows[:, None] < q_len) & (cols[None, :] < D), other=0.0).to(tl.float32)
                if MEAN:
                    if IEEE:
                        bound = tl.dot(qv, tl.trans(lo_keys), input_precision="ieee")
                    else:
                        bound = tl.dot(qv.to(lo_keys.dtype), tl.trans(lo_keys))
                else:
                    bound = quest_bound(qv, lo_keys, hi_keys, IEEE)
                bound = tl.where(rows[:, None] < q_len, bound, float("-inf"))
                best = tl.maximum(best, tl.max(bound, axis=0))  # max over the tile's queries
            if SUM_HEADS:
                acc += best
            else:
                acc = tl.maximum(acc, best)
    out = tl.where(forced, float("inf"), tl.where(candidate, acc, float("-inf")))
    tl.store(scores + t * s_st + s * s_sh + blk, out, mask=blk < max_blocks)


# ------------------------------------------------------------------------------------ sparse attention
@triton.jit
def _attend_kernel(q, k_cache, v_cache, out, block_tables, context_lens, sel, sel_count,
                   tile_seq, tile_q_start, tile_q_len, tile_first, scale_log2,
                   s_qt, s_qh, s_ot, s_oh, s_kb, s_kh, s_ko, s_bt, s_st, s_sh,
                   BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                   GROUP: tl.constexpr, HEADS_PER_SEL: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    s = tl.program_id(1)
    chunk = tl.program_id(2)
    seq = tl.load(tile_seq + t)
    q_start = tl.load(tile_q_start + t)
    q_len = tl.load(tile_q_len + t)
    first = tl.load(tile_first + t)
    ctx = tl.load(context_lens + seq)
    n_sel = tl.load(sel_count + t)
    if chunk * BLOCK_R >= q_len * HEADS_PER_SEL:  # this tile has fewer rows than the widest one
        n_sel = 0
    kv_head = (s * HEADS_PER_SEL) // GROUP
    # Rows = (query of the tile, head of the selection group): the GQA group's queries form one tile.
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    m = rows // HEADS_PER_SEL
    head = s * HEADS_PER_SEL + rows % HEADS_PER_SEL
    row_ok = m < q_len
    q_pos = first + m
    cols = tl.arange(0, BLOCK_D)
    dmask = cols[None, :] < D
    qv = tl.load(q + (q_start + m)[:, None] * s_qt + head[:, None] * s_qh + cols[None, :],
                 mask=row_ok[:, None] & dmask, other=0.0)
    offs = tl.arange(0, BS)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_sel):
        logical = tl.load(sel + t * s_st + s * s_sh + j)
        phys = tl.load(block_tables + seq * s_bt + logical)
        kv_off = phys * s_kb + kv_head * s_kh + offs[:, None] * s_ko + cols[None, :]
        key_pos = logical * BS + offs
        kmask = (key_pos[:, None] < ctx) & dmask
        kb = tl.load(k_cache + kv_off, mask=kmask, other=0.0)
        vb = tl.load(v_cache + kv_off, mask=kmask, other=0.0)
        if IEEE:
            sc = tl.dot(qv, tl.trans(kb), input_precision="ieee")
        else:
            sc = tl.dot(qv, tl.trans(kb))
        sc = sc * scale_log2
        ok = row_ok[:, None] & (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < ctx)
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vb.dtype), vb)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # Rows with nothing to attend (impossible with a valid selection: every query keeps its own block) give 0.
    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + (q_start + m)[:, None] * s_ot + head[:, None] * s_oh + cols[None, :],
             res.to(out.dtype.element_ty), mask=row_ok[:, None] & dmask)


# ------------------------------------------------------------------------------------ host side
def _device_tiles(meta: AttentionMetadata, tiles, device: torch.device, block_size: int, budget_blocks: int,
                  sink_blocks: int, recent_blocks: int) -> dict[str, torch.Tensor]:
    """Tile descriptors on the device. Decode: derived from the metadata's device tensors (no copy, no wait);
    prefill: one small host-to-device copy (pinned, asynchronous on CUDA)."""
    if meta.is_pure_decode and len(tiles) == meta.num_seqs:
        n = meta.num_seqs
        last = meta.context_lens[:n].to(device=device, dtype=torch.int32) - 1
        d = {"seq": torch.arange(n, dtype=torch.int32, device=device),
             "q_start": meta.query_start_loc[:n].to(device=device, dtype=torch.int32),
             "q_len": torch.ones(n, dtype=torch.int32, device=device), "first": last, "last": last}
    else:
        host = torch.tensor([[t.seq, t.q_start, t.q_end - t.q_start, t.first_pos, t.last_pos] for t in tiles],
                            dtype=torch.int32)
        if device.type == "cuda":
            host = host.pin_memory()
        cols = host.to(device, non_blocking=True).t()
        d = {"seq": cols[0], "q_start": cols[1], "q_len": cols[2], "first": cols[3], "last": cols[4]}
    # Blocks each tile attends to, as in reference.tile_selected_count.
    lo = torch.clamp_min(torch.div(d["first"], block_size, rounding_mode="floor") - (recent_blocks - 1), 0)
    hi = torch.div(d["last"], block_size, rounding_mode="floor")
    kept = torch.clamp_max(lo, sink_blocks) + hi - lo + 1
    d["count"] = torch.minimum(hi + 1, torch.clamp_min(kept, budget_blocks)).to(torch.int32)
    return {k: v.contiguous() for k, v in d.items()}


def select(q: torch.Tensor, aux: dict[str, torch.Tensor], meta: AttentionMetadata, *, topk_tokens: int,
           sink_blocks: int, recent_blocks: int, per_head: bool, head_reduce: str, prefill_tile: int,
           score: str = "mean") -> HyLRASelection:
    mean = score == "mean"
    first = aux["kmean"] if mean else aux["kmin"]
    kmin, kmax, kmean = aux.get("kmin", first), aux.get("kmax", first), aux.get("kmean", first)
    device = check_same_device(q=q, summaries=first)
    check_block_size(meta.block_size)
    bs = meta.block_size
    budget_blocks = -(-topk_tokens // bs)
    tiles = make_tiles(meta, prefill_tile)
    hq, d = q.shape[1], q.shape[2]
    hkv = first.shape[1]
    group = hq // hkv
    num_sel = hq if per_head else hkv
    tile_t = _device_tiles(meta, tiles, device, bs, budget_blocks, sink_blocks, recent_blocks)
    block_tables = meta.block_tables.to(device=device, dtype=torch.int32)
    max_blocks = block_tables.shape[1]
    if meta.is_pure_decode:
        # Independent of the context lengths, so a CUDA graph captured once serves every later decode step.
        width = min(max(budget_blocks, sink_blocks + recent_blocks), max_blocks)
    else:
        width = max((tile_selected_count(t, bs, budget_blocks, sink_blocks, recent_blocks) for t in tiles),
                    default=0)
    if not tiles:
        return HyLRASelection(tiles, torch.empty(0, num_sel, 0, dtype=torch.int32, device=device), per_head, bs,
                              tile_t)
    scores = torch.empty(len(tiles), num_sel, max_blocks, dtype=torch.float32, device=device)
    block_n = 32
    max_q = max(t.q_end - t.q_start for t in tiles)
    _score_blocks_kernel[(len(tiles), num_sel, triton.cdiv(max_blocks, block_n))](
        q, kmin, kmax, kmean, block_tables, tile_t["seq"], tile_t["q_start"], tile_t["q_len"], tile_t["first"],
        tile_t["last"], scores, max_blocks,
        q.stride(0), q.stride(1), first.stride(0), first.stride(1), block_tables.stride(0), scores.stride(0),
        scores.stride(1),
        BS=bs, D=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK_M=16, BLOCK_N=block_n,
        GROUP=group, HEADS_PER_SEL=1 if per_head else group, SINK=sink_blocks, RECENT=recent_blocks,
        SUM_HEADS=head_reduce == "sum", IEEE=q.dtype == torch.float32, MEAN=mean)
    # Forced blocks score +inf, invisible ones -inf, so the top `count` of each row are exactly the selection.
    top = scores.topk(width, dim=-1).indices
    keep = torch.arange(width, device=device)[None, None, :] < tile_t["count"][:, None, None]
    big = torch.iinfo(torch.int32).max
    blocks = torch.where(keep, top.to(torch.int32), big).sort(dim=-1).values
    blocks = torch.where(blocks == big, -1, blocks)
    return HyLRASelection(tiles, blocks, per_head, bs, tile_t)


def check_block_size(block_size: int) -> None:
    # tl.dot needs every tile side >= 16, and tl.arange a power of two.
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton HyLRA kernels need a power-of-two block size >= 16, got {block_size}")


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           selection: HyLRASelection, scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every step token over its tile's selected blocks into out (new if None). [T, Hq, D]."""
    device = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    check_block_size(meta.block_size)
    if selection.block_size != meta.block_size:
        raise ValueError("selection was made with another block size")
    out = torch.empty_like(q) if out is None else out
    tiles = selection.tiles
    if not tiles:
        return out
    hq, d = q.shape[1], q.shape[2]
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    tile_t = selection.device_tiles
    if tile_t is None:  # a selection from the reference path
        tile_t = _device_tiles(meta, tiles, device, bs, 0, 0, 1)
        tile_t["count"] = (selection.blocks >= 0).sum(-1).amax(-1).to(device=device, dtype=torch.int32)
    sel = selection.blocks.to(device=device, dtype=torch.int32)
    block_tables = meta.block_tables.to(device=device, dtype=torch.int32)
    context_lens = meta.context_lens.to(device=device, dtype=torch.int32)
    heads_per_sel = 1 if selection.per_head else group
    max_q = max(t.q_end - t.q_start for t in tiles)
    scale = d ** -0.5 if scale is None else scale
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    rows = max_q * heads_per_sel
    # Row chunks of at most 64 (query, head) rows keep the float32 accumulator in registers.
    block_r = min(max(16, next_power_of_2(rows)), 64 if d <= 128 else 32)
    _attend_kernel[(len(tiles), sel.shape[1], triton.cdiv(rows, block_r))](
        q, k_cache, v_cache, out, block_tables, context_lens, sel, tile_t["count"],
        tile_t["seq"], tile_t["q_start"], tile_t["q_len"], tile_t["first"], scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), sel.stride(0), sel.stride(1),
        BS=bs, D=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK_R=block_r,
        GROUP=group, HEADS_PER_SEL=heads_per_sel, IEEE=q.dtype == torch.float32)
    return out
