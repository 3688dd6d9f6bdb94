"""PyTorch reference for HyLRA: per-block key bounds, block scoring, top-k block selection, attention over the
selected blocks. The oracle for kernels/triton/hylra.py and the CPU path of kernels/hylra.py.

Selection semantics (shared by the reference and the Triton path)
- A step's queries are cut into tiles: per sequence, runs of at most `prefill_tile` consecutive query tokens
  (a decode token is a tile of one). Every tile selects its own blocks (logical block indices, i.e. indices
  into the sequence's block table, so a later layer with another cache can reuse them).
- Always kept: the first `sink_blocks` blocks and the tile's local blocks: from `recent_blocks - 1` blocks
  before the first query's block up to the last query's block (so every query sees at least its own block
  and the recent_blocks - 1 before it). Keys after a query's position are masked (causality).
- The rest of the budget, budget_blocks = ceil(topk_tokens / block_size) blocks in all, goes to the highest
  scoring blocks that lie before the local run. A tile keeps max(budget_blocks, kept) blocks, or every
  visible block when there are fewer.
- Block score (`score`): "mean": q . (mean key of the block); "bound": the Quest upper bound of q.k over the
  block, sum_d max(q_d * kmin_d, q_d * kmax_d), computed as relu(q) . kmax + min(q, 0) . kmin (the same
  value: a positive q_d picks kmax_d, a negative one kmin_d). Reduced by max over the tile's queries, then
  over the query heads sharing a selection by `head_reduce` ("sum" or "max"); with per_head each query head
  selects for itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import AttentionMetadata
from .block_summaries import quest_bound
from .dense import attention_with_lse, causal_attention, gather_kv


@dataclass(frozen=True)
class Tile:
    """A run of one sequence's query tokens that shares one block selection."""

    seq: int  # sequence index in the step's metadata
    q_start: int  # index of the first query token in the flattened step
    q_end: int  # one past the last
    first_pos: int  # absolute position of the first query
    last_pos: int  # absolute position of the last query


@dataclass
class HyLRASelection:
    """What a COMPUTE layer leaves in StepState.selections for the REUSE layers after it.

    blocks[t, h, j]: the j-th logical block selected by tile t for selection head h (-1: padding), where
    h is a KV head (shared across the GQA group) or a query head (per_head).
    """

    tiles: list[Tile]
    blocks: torch.Tensor  # [num_tiles, num_sel_heads, max_selected] int64 (int32 on the Triton path)
    per_head: bool
    block_size: int
    device_tiles: dict | None = None  # Triton path: tile descriptors already on the device (for REUSE layers)


def make_tiles(meta: AttentionMetadata, prefill_tile: int) -> list[Tile]:
    tiles = []
    start = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
        first = ctx - qlen  # absolute position of the sequence's first step token
        for off in range(0, qlen, prefill_tile):
            n = min(prefill_tile, qlen - off)
            tiles.append(Tile(s, start + off, start + off + n, first + off, first + off + n - 1))
        start += qlen
    return tiles


def local_blocks(tile: Tile, block_size: int, recent_blocks: int) -> tuple[int, int]:
    """Inclusive range of logical blocks always kept for the tile's queries (their own blocks and the recent)."""
    hi = tile.last_pos // block_size
    lo = max(0, tile.first_pos // block_size - (recent_blocks - 1))
    return lo, hi


def tile_selected_count(tile: Tile, block_size: int, budget_blocks: int, sink_blocks: int,
                        recent_blocks: int) -> int:
    """How many blocks the tile attends to (the same for every selection head)."""
    lo, hi = local_blocks(tile, block_size, recent_blocks)
    visible = hi + 1
    kept = min(sink_blocks, lo) + (hi - lo + 1)
    return min(visible, max(budget_blocks, kept))


def block_upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest bound of q.k over each block. q [Hq, M, D]; kmin/kmax [nb, Hkv, D]. Returns [Hq, M, nb] float32
    (unscaled)."""
    return quest_bound(q.float(), kmin.float().transpose(0, 1), kmax.float().transpose(0, 1))


def block_mean_scores(q: torch.Tensor, kmean: torch.Tensor) -> torch.Tensor:
    """q . mean key of each block. q [Hq, M, D]; kmean [nb, Hkv, D]. Returns [Hq, M, nb] float32 (unscaled)."""
    group = q.shape[0] // kmean.shape[1]
    return torch.bmm(q.float(), kmean.float().permute(1, 2, 0).repeat_interleave(group, dim=0))


def summary_table(score: str) -> str:
    """An aux table every layer scored with `score` has (to read the KV head count from)."""
    return "kmean" if score == "mean" else "kmin"


def block_scores(q: torch.Tensor, aux: dict[str, torch.Tensor], phys: torch.Tensor, score: str) -> torch.Tensor:
    """[Hq, M, nb] scores of the physical blocks phys for queries q [Hq, M, D] ("mean" or "bound")."""
    if score == "mean":
        return block_mean_scores(q, aux["kmean"][phys])
    return block_upper_bounds(q, aux["kmin"][phys], aux["kmax"][phys])


def reduce_scores(bounds: torch.Tensor, num_kv_heads: int, per_head: bool, head_reduce: str) -> torch.Tensor:
    """[Hq, M, nb] bounds -> [num_sel_heads, nb] block scores (max over queries, then over the group)."""
    per_query_head = bounds.amax(dim=1)  # [Hq, nb]
    if per_head:
        return per_query_head
    grouped = per_query_head.reshape(num_kv_heads, -1, per_query_head.shape[-1])
    return grouped.amax(dim=1) if head_reduce == "max" else grouped.sum(dim=1)


def select_tile_blocks(q_tile: torch.Tensor, aux: dict[str, torch.Tensor], block_table: torch.Tensor,
                       tile: Tile, block_size: int, budget_blocks: int, sink_blocks: int, recent_blocks: int,
                       per_head: bool, head_reduce: str, score: str) -> torch.Tensor:
    """Sorted logical block ids [num_sel_heads, n] one tile attends to. q_tile [M, Hq, D]."""
    hq, hkv = q_tile.shape[1], aux[summary_table(score)].shape[1]
    num_sel = hq if per_head else hkv
    lo, hi = local_blocks(tile, block_size, recent_blocks)
    kept = torch.cat([torch.arange(min(sink_blocks, lo)), torch.arange(lo, hi + 1)]).to(q_tile.device)
    n_total = tile_selected_count(tile, block_size, budget_blocks, sink_blocks, recent_blocks)
    n_top = n_total - kept.numel()
    kept = kept[None].expand(num_sel, -1)
    if n_top <= 0:
        return kept.clone()
    candidates = torch.arange(min(sink_blocks, lo), lo, device=q_tile.device)  # blocks before the local run
    phys = block_table[candidates].long()
    per_query = block_scores(q_tile.transpose(0, 1), aux, phys, score)
    scores = reduce_scores(per_query, hkv, per_head, head_reduce)  # [num_sel, n_candidates]
    top = candidates[scores.topk(n_top, dim=-1).indices]
    return torch.cat([kept, top], dim=1).sort(dim=1).values


def covers_all(blocks: torch.Tensor, last_pos: int, block_size: int) -> bool:
    """Whether every selection head selected every block visible to a query at last_pos."""
    n_visible = last_pos // block_size + 1
    return blocks.shape[1] == n_visible and bool((blocks == torch.arange(n_visible, device=blocks.device)).all())


def attend_tile(q_tile: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                blocks: torch.Tensor, q_positions: torch.Tensor, context_len: int,
                scale: float | None = None) -> torch.Tensor:
    """Causal attention of q_tile [M, Hq, D] over the selected logical blocks [num_sel_heads, n] (-1: none).
    Each selection head reads its own blocks, except that per-query-head selections of a GQA group whose
    union is at most 1.5x one head's selection (budgets near the context: they overlap) are read once per KV
    head, each query head masking the blocks it did not select. Returns [M, Hq, D] in q's dtype."""
    m, hq, d = q_tile.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    num_sel = blocks.shape[0]
    dev = blocks.device
    valid_block = blocks >= 0
    logical = blocks.clamp_min(0)
    kv_head = torch.arange(num_sel, device=dev) // (num_sel // hkv)  # selection head -> its KV head
    readers, cache_head, key_ok = num_sel, kv_head, valid_block  # who reads which blocks, and which keys count
    if num_sel > hkv:
        nb = (context_len + bs - 1) // bs
        picked = torch.zeros(num_sel, nb + 1, dtype=torch.bool, device=dev)  # column nb: the -1 padding
        picked[torch.arange(num_sel, device=dev)[:, None], torch.where(valid_block, blocks, nb)] = True
        union = torch.zeros(hkv, nb, dtype=torch.int32, device=dev).index_add_(0, kv_head, picked[:, :nb].int()) > 0
        width = int(union.sum(1).max())
        if 2 * width <= 3 * int(valid_block.sum(1).max()):
            # each KV head's union in position order, padded with blocks numbered nb.. (past the context: masked)
            order = torch.arange(nb, device=dev).expand(hkv, nb) if width == nb else \
                (torch.arange(nb, device=dev) + torch.where(union, 0, nb)).sort(1).values[:, :width]
            logical, readers, cache_head = order % nb, hkv, torch.arange(hkv, device=dev)
            key_ok = picked.gather(1, logical[kv_head]) & (order[kv_head] < nb)  # [num_sel, n]: its own blocks
    # (block, KV head) slabs of the cache seen as [blocks * Hkv, bs, D] (a view also of vLLM's strided K and V):
    # index_select copies each slab at once
    rows = (block_table[logical].long() * hkv + cache_head[:, None]).reshape(-1)
    k = k_cache.flatten(0, 1).index_select(0, rows).view(readers, -1, d)  # [readers, n * bs, D]
    v = v_cache.flatten(0, 1).index_select(0, rows).view(readers, -1, d)
    key_pos = (logical[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(readers, -1)
    key_pos = key_pos if readers == num_sel else key_pos[kv_head]  # [num_sel, N]
    key_ok = key_ok[:, :, None].expand(-1, -1, bs).reshape(num_sel, -1) & (key_pos < context_len)
    mask = key_ok[:, None, :] & (key_pos[:, None, :] <= q_positions[None, :, None])  # [num_sel, M, N]
    mask = mask.repeat_interleave(hq // num_sel, dim=0)  # [Hq, M, N]
    out, _ = attention_with_lse(q_tile.transpose(0, 1), k, v, mask, scale)
    return out.transpose(0, 1).to(q_tile.dtype)


def select(q: torch.Tensor, aux: dict[str, torch.Tensor], meta: AttentionMetadata, *, topk_tokens: int,
           sink_blocks: int, recent_blocks: int, per_head: bool, head_reduce: str, prefill_tile: int,
           score: str = "mean") -> HyLRASelection:
    """Every tile's selection for one layer's queries q [T, Hq, D] (aux tables already updated)."""
    bs = meta.block_size
    budget_blocks = -(-topk_tokens // bs)
    tiles = make_tiles(meta, prefill_tile)
    per_tile = [select_tile_blocks(q[t.q_start:t.q_end], aux, meta.block_tables[t.seq], t, bs, budget_blocks,
                                   sink_blocks, recent_blocks, per_head, head_reduce, score) for t in tiles]
    num_sel = q.shape[1] if per_head else aux[summary_table(score)].shape[1]
    width = max((b.shape[1] for b in per_tile), default=0)
    blocks = torch.full((len(tiles), num_sel, width), -1, dtype=torch.long, device=q.device)
    for i, b in enumerate(per_tile):
        blocks[i, :, :b.shape[1]] = b
    return HyLRASelection(tiles, blocks, per_head, bs)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           selection: HyLRASelection, scale: float | None = None) -> torch.Tensor:
    """Attention of every step token over its tile's selected blocks. [T, Hq, D]."""
    if selection.block_size != meta.block_size:
        raise ValueError("selection was made with another block size")
    out = torch.empty_like(q)
    bs = meta.block_size
    trimmed = []
    for i, t in enumerate(selection.tiles):
        blocks = selection.blocks[i].long()
        trimmed.append(blocks[:, :int((blocks >= 0).sum(dim=1).max())])
    by_seq: dict[int, list[int]] = {}
    for i, t in enumerate(selection.tiles):
        by_seq.setdefault(t.seq, []).append(i)
    for s, tile_ids in by_seq.items():
        table, ctx = meta.block_tables[s], meta.context_lens_cpu[s]
        if all(covers_all(trimmed[i], selection.tiles[i].last_pos, bs) for i in tile_ids):
            # Short context, everything selected: the dense computation itself (bit for bit what dense gives).
            sl = slice(selection.tiles[tile_ids[0]].q_start, selection.tiles[tile_ids[-1]].q_end)
            out[sl] = causal_attention(q[sl], gather_kv(k_cache, table, ctx), gather_kv(v_cache, table, ctx),
                                       meta.positions[sl], scale)
            continue
        for i in tile_ids:
            t = selection.tiles[i]
            out[t.q_start:t.q_end] = attend_tile(q[t.q_start:t.q_end], k_cache, v_cache, table, trimmed[i],
                                                 meta.positions[t.q_start:t.q_end], ctx, scale)
    return out
