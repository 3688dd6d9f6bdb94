"""PyTorch reference for routing attention: spherical k-means over a sequence's cached keys, cluster tables,
query routing (cluster selection under a token budget) and attention over the selection.

The oracle for kernels/triton/routing.py and the CPU path of kernels/routing.py. docs/routing.md explains
the method; the semantics shared by both paths are fixed here.

Clustering (per sequence, layer and KV head; all KV heads of a layer are batched in one ClusterTable)
- The keys are cut into segments of `segment_tokens` positions. When a segment is complete its keys are
  clustered by spherical k-means into `clusters_per_segment` clusters: centroids start at evenly spaced keys
  of the segment (deterministic, so a preempted sequence rebuilds the same tables), then `kmeans_iters` Lloyd
  iterations (assign each key to the centroid of highest cosine, centroid = normalised mean of its unit keys).
- Keys of the open (incomplete) segment are assigned online to the "live" codebook: a copy of the last closed
  segment's centroids that is updated by an exponential moving average as keys join (Routing Transformer):
  a cluster that receives n keys of one update becomes normalise(decay^n * c + (1 - decay^n) * mean unit key).
  The keys of an update are assigned with the centroids as they were before it. When the segment completes,
  its keys are re-clustered by k-means like every other segment and the live codebook restarts from them.
- Keys are processed lazily: only when a key is about to leave the exact local region of some query (or a
  segment completes), and then every key written so far. Inside the local region a key is attended exactly
  anyway, so assigning it earlier would change nothing; batching saves a dozen small kernels per decode step.
- Until the first segment completes a sequence has no codebook and is attended densely.
- A cluster is scored by the mean of its (raw, not normalised) member keys: q . mean is the mean logit of its
  members, i.e. its attention mass per token up to Jensen's inequality.

Cluster tables (ClusterTable): members of each cluster are stored contiguously in `perm` (token positions), in
ascending position order; closed segment s owns perm[:, s*S:(s+1)*S] and clusters s*C..s*C+C-1, the open
segment follows. So a cluster's members are gathered without scanning, and the members below a position x are
a prefix of the cluster's run.

Routing (per query tile: a decode token, or up to `prefill_tile` consecutive prompt tokens of one sequence)
- Exact region: sinks [0, min(sink_tokens, lo)) and the local region [lo, last_pos] with
  lo = max(0, min(chunk_start, first_pos - window + 1)): the current chunk is attended causally, plus the
  `window` keys before each tile. Without a codebook lo = 0 (dense).
- Routed region: keys in [sink_tokens, lo). Every cluster is scored by max over the tile's queries of
  (sum over the GQA group of q) . mean; clusters are taken by descending score while the tokens taken so far
  (counting only members in the routed region) are below the budget (`budget_tokens`, or
  ceil(budget_frac * (last_pos + 1))). So a budget that covers the routed region gives dense attention.
- Each key is attended once: sinks, local region and routed members are disjoint by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..base import AttentionMetadata
from .dense import attention_with_lse

# Bound the [heads, queries, clusters] score tensor of one scoring pass (elements).
_MAX_SCORE_ELEMENTS = 1 << 24


# ---------------------------------------------------------------- k-means primitives (kernel oracles)

def assign(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine: argmax_c keys . centroids[c] (centroids are unit vectors, so the key's norm
    does not matter). keys [B, N, D], centroids [B, C, D]. Returns int32 [B, N]; ties go to the lowest index."""
    scores = torch.bmm(keys.float(), centroids.float().transpose(1, 2))
    return scores.argmax(dim=-1).to(torch.int32)


def update_centroids(keys: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor, decay: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segmented sums of the keys per cluster, and the moving-average centroid update.

    keys [B, N, D], assignment [B, N] (cluster ids in [0, C)), centroids [B, C, D] unit vectors.
    A cluster with n new keys becomes normalise(decay^n * c + (1 - decay^n) * mean of its new unit keys);
    decay = 0 is a Lloyd step (normalised mean), decay = 1 keeps the centroids. A cluster with no new key keeps
    its centroid. Returns (new centroids float32 [B, C, D], sums of the raw keys float32 [B, C, D],
    counts int32 [B, C])."""
    b, n, d = keys.shape
    c = centroids.shape[1]
    kf = keys.float()
    unit = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    index = assignment.long().unsqueeze(-1).expand(b, n, d)
    raw_sums = torch.zeros(b, c, d, dtype=torch.float32, device=keys.device).scatter_add_(1, index, kf)
    unit_sums = torch.zeros(b, c, d, dtype=torch.float32, device=keys.device).scatter_add_(1, index, unit)
    counts = torch.zeros(b, c, dtype=torch.int32, device=keys.device).scatter_add_(
        1, assignment.long(), torch.ones_like(assignment, dtype=torch.int32))
    keep = torch.tensor(decay, dtype=torch.float32, device=keys.device) ** counts.float()  # decay^n (0^0 = 1)
    mean_unit = unit_sums / counts.clamp_min(1).unsqueeze(-1).float()
    moved = keep.unsqueeze(-1) * centroids.float() + (1 - keep).unsqueeze(-1) * mean_unit
    moved = moved / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    new = torch.where(counts.unsqueeze(-1) > 0, moved, centroids.float())
    return new, raw_sums, counts


REFERENCE_OPS = SimpleNamespace(assign=assign, update_centroids=update_centroids)


def initial_centroids(keys: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Evenly spaced keys of each batch row, normalised: [B, C, D] float32."""
    n = keys.shape[1]
    idx = (torch.arange(num_clusters, device=keys.device) * n) // num_clusters
    init = keys[:, idx].float()
    return init / init.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kmeans(keys: torch.Tensor, num_clusters: int, iters: int, ops=REFERENCE_OPS
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means of keys [B, N, D]. Returns (centroids [B, C, D], assignment int32 [B, N] to those
    centroids, raw key sums [B, C, D] and counts [B, C] of that assignment)."""
    centroids = initial_centroids(keys, num_clusters)
    for _ in range(iters):
        centroids, _, _ = ops.update_centroids(keys, ops.assign(keys, centroids), centroids, 0.0)
    assignment = ops.assign(keys, centroids)
    _, sums, counts = ops.update_centroids(keys, assignment, centroids, 1.0)
    return centroids, assignment, sums, counts


# ---------------------------------------------------------------- per-sequence cluster tables

def gather_keys(k_cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Keys at positions [start, end) of one sequence: [Hkv, end - start, D] in the cache dtype."""
    bs = k_cache.shape[2]
    pos = torch.arange(start, end, device=k_cache.device)
    blocks = block_table[torch.div(pos, bs, rounding_mode="floor")].long()
    return k_cache[blocks, :, pos % bs].transpose(0, 1)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, dim=-1) - x


class ClusterTable:
    """Cluster state of one sequence in one layer, all KV heads batched (H = num_kv_heads).

    Cluster g (global id) has members perm[h, start[h, g] : start[h, g] + size[h, g]] (positions, ascending),
    mean key mean[h, g] and pre_sink[h, g] members below sink_tokens. cid[h, j] is the cluster of perm[h, j].
    Closed segment s: clusters s*C .. s*C + C - 1, perm entries s*S .. s*S + S - 1; the open segment's clusters
    and members follow (rebuilt at each online update).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, segment_tokens: int, clusters_per_segment: int,
                 sink_tokens: int, device: torch.device):
        self.heads, self.head_dim = num_kv_heads, head_dim
        self.segment_tokens, self.clusters_per_segment = segment_tokens, clusters_per_segment
        self.sink_tokens = sink_tokens
        self.device = device
        self.num_closed = 0  # complete, k-means clustered segments
        self.num_seen = 0  # keys [0, num_seen) are in the tables (or, before any codebook, simply skipped)
        self.num_open = 0  # keys of the open segment assigned online
        self._seg_capacity = 0
        self._alloc(2)
        c, h = clusters_per_segment, num_kv_heads
        self.live = torch.zeros(h, c, head_dim, dtype=torch.float32, device=device)
        self.open_assign = torch.zeros(h, segment_tokens, dtype=torch.int32, device=device)
        self.open_sums = torch.zeros(h, c, head_dim, dtype=torch.float32, device=device)
        self.open_counts = torch.zeros(h, c, dtype=torch.int32, device=device)

    # -- storage ---------------------------------------------------------------------------------------
    def _alloc(self, segments: int) -> None:
        """Room for `segments` segments (closed ones plus the open one), keeping what is stored."""
        if segments <= self._seg_capacity:
            return
        h, s, c, d, dev = self.heads, self.segment_tokens, self.clusters_per_segment, self.head_dim, self.device
        new = max(segments, 2 * self._seg_capacity)
        fresh = {
            "perm": torch.zeros(h, new * s, dtype=torch.int32, device=dev),
            "cid": torch.zeros(h, new * s, dtype=torch.int32, device=dev),
            "start": torch.zeros(h, new * c, dtype=torch.int32, device=dev),
            "size": torch.zeros(h, new * c, dtype=torch.int32, device=dev),
            "pre_sink": torch.zeros(h, new * c, dtype=torch.int32, device=dev),
            "mean": torch.zeros(h, new * c, d, dtype=torch.float32, device=dev),
        }
        if self._seg_capacity:
            for name, t in fresh.items():
                old = getattr(self, name)
                t[:, :old.shape[1]] = old
        for name, t in fresh.items():
            setattr(self, name, t)
        self._seg_capacity = new

    @property
    def has_codebook(self) -> bool:
        return self.num_closed > 0

    @property
    def num_clusters(self) -> int:
        """Clusters in the tables: the closed segments' and (once a codebook exists) the open segment's."""
        return (self.num_closed + 1) * self.clusters_per_segment if self.num_closed else 0

    @property
    def num_members(self) -> int:
        return self.num_closed * self.segment_tokens + self.num_open

    def nbytes(self) -> int:
        names = ("perm", "cid", "start", "size", "pre_sink", "mean", "live", "open_assign", "open_sums",
                 "open_counts")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # -- updates ---------------------------------------------------------------------------------------
    def catch_up(self, k_cache: torch.Tensor, block_table: torch.Tensor, context_len: int, need_below: int,
                 kmeans_iters: int, decay: float, ops=REFERENCE_OPS) -> None:
        """Bring the tables up to date with the sequence's cache (keys [0, context_len) written).

        Completed segments are clustered at once; keys of the open segment are assigned (all of those written)
        only when some key below `need_below` is not yet in the tables."""
        s = self.segment_tokens
        complete = context_len // s
        if complete > self.num_closed:
            self._close_segments(k_cache, block_table, complete, kmeans_iters, ops)
        if self.num_closed and self.num_seen < min(need_below, context_len):
            self._assign_open(k_cache, block_table, context_len, decay, ops)
        elif not self.num_closed:
            self.num_seen = context_len

    def _close_segments(self, k_cache, block_table, complete: int, iters: int, ops) -> None:
        s, c, h, d = self.segment_tokens, self.clusters_per_segment, self.heads, self.head_dim
        first = self.num_closed
        n = complete - first
        self._alloc(complete + 1)
        keys = gather_keys(k_cache, block_table, first * s, complete * s)  # [H, n*S, D]
        batch = keys.reshape(h, n, s, d).transpose(0, 1).reshape(n * h, s, d).contiguous()
        centroids, assignment, sums, counts = kmeans(batch, c, iters, ops)
        assignment = assignment.reshape(n, h, s)
        sums, counts = sums.reshape(n, h, c, d), counts.reshape(n, h, c)
        for j in range(n):
            seg = first + j
            self._write_clusters(seg, assignment[j], sums[j], counts[j], s)
        self.live = centroids.reshape(n, h, c, d)[-1].clone()
        self.num_closed = complete
        self.num_seen = complete * s
        self.num_open = 0
        self.open_sums.zero_()
        self.open_counts.zero_()

    def _write_clusters(self, seg: int, assignment: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                        length: int) -> None:
        """Store segment `seg`'s clusters from the assignment [H, length] of its first `length` keys."""
        s, c = self.segment_tokens, self.clusters_per_segment
        base, cbase = seg * s, seg * c
        order = torch.sort(assignment.long(), dim=1, stable=True)  # stable: positions stay ascending
        self.perm[:, base:base + length] = (order.indices + base).to(torch.int32)
        self.cid[:, base:base + length] = (order.values + cbase).to(torch.int32)
        self.size[:, cbase:cbase + c] = counts
        self.start[:, cbase:cbase + c] = (_exclusive_cumsum(counts.long()) + base).to(torch.int32)
        self.mean[:, cbase:cbase + c] = sums / counts.clamp_min(1).unsqueeze(-1).float()
        sink = min(max(self.sink_tokens - base, 0), length)  # this segment's keys below sink_tokens
        pre = torch.zeros_like(counts)
        if sink > 0:
            pre.scatter_add_(1, assignment[:, :sink].long(), torch.ones_like(assignment[:, :sink]))
        self.pre_sink[:, cbase:cbase + c] = pre

    def _assign_open(self, k_cache, block_table, context_len: int, decay: float, ops) -> None:
        begin = self.num_seen
        keys = gather_keys(k_cache, block_table, begin, context_len).contiguous()
        assignment = ops.assign(keys, self.live)
        self.live, sums, counts = ops.update_centroids(keys, assignment, self.live, decay)
        off = begin - self.num_closed * self.segment_tokens
        self.open_assign[:, off:off + keys.shape[1]] = assignment
        self.open_sums += sums
        self.open_counts += counts
        self.num_open = off + keys.shape[1]
        self.num_seen = context_len
        self._write_clusters(self.num_closed, self.open_assign[:, :self.num_open], self.open_sums,
                             self.open_counts, self.num_open)


# ---------------------------------------------------------------- routing

@dataclass(frozen=True)
class Tile:
    """A run of one sequence's query tokens that shares one routed selection."""

    seq: int  # sequence index in the step's metadata
    q_start: int  # first query token in the flattened step
    q_len: int
    first_pos: int  # absolute position of the first query
    last_pos: int
    sink_end: int  # sinks: keys [0, sink_end)
    local_lo: int  # local region: keys [local_lo, last_pos]; routed keys lie in [sink_tokens, local_lo)
    budget: int  # routed-token budget


@dataclass
class RoutingSelection:
    """What a routing layer attends to (left in StepState.selections for REUSE layers and for reports).

    routed[t, h, :routed_count[t, h]]: the positions tile t routes to for KV head h (-1: padding).
    tile_info [T, 8] int32 on the device: seq, q_start, q_len, first_pos, last_pos, sink_end, local_lo, 0.
    """

    tiles: list[Tile]
    routed: torch.Tensor  # [T, Hkv, L] int32
    routed_count: torch.Tensor  # [T, Hkv] int32
    tile_info: torch.Tensor

    def positions(self, t: int, h: int) -> torch.Tensor:
        """Every key position tile t attends to for KV head h (the causal mask still applies)."""
        tile = self.tiles[t]
        dev = self.routed.device
        return torch.cat([torch.arange(tile.sink_end, device=dev),
                          self.routed[t, h, :int(self.routed_count[t, h])].long(),
                          torch.arange(tile.local_lo, tile.last_pos + 1, device=dev)])


def make_tiles(meta: AttentionMetadata, prefill_tile: int, window: int, sink_tokens: int,
               budget_tokens: int, budget_frac: float | None) -> list[Tile]:
    """The step's query tiles with their exact regions, before knowing which sequences have a codebook."""
    tiles = []
    start = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
        chunk_start = ctx - qlen
        for off in range(0, qlen, prefill_tile):
            n = min(prefill_tile, qlen - off)
            first, last = chunk_start + off, chunk_start + off + n - 1
            lo = max(0, min(chunk_start, first - window + 1))
            budget = budget_tokens if budget_frac is None else math.ceil(budget_frac * (last + 1))
            tiles.append(Tile(s, start + off, n, first, last, min(sink_tokens, lo), lo, budget))
        start += qlen
    return tiles


def dense_tile(tile: Tile) -> Tile:
    """The tile attending densely (its sequence has no codebook yet)."""
    return Tile(tile.seq, tile.q_start, tile.q_len, tile.first_pos, tile.last_pos, 0, 0, tile.budget)


def tile_info_tensor(tiles: list[Tile], device: torch.device) -> torch.Tensor:
    rows = [[t.seq, t.q_start, t.q_len, t.first_pos, t.last_pos, t.sink_end, t.local_lo, 0] for t in tiles]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(tiles), 8).to(device)


def tile_scores(qsum: torch.Tensor, tiles: list[Tile], q_offset: int, mean: torch.Tensor) -> torch.Tensor:
    """Score of every cluster for each tile: max over the tile's queries of qsum . mean.
    qsum [M, H, D] (the GQA group's queries summed) of the sequence's step tokens starting at q_offset;
    mean [H, ncl, D]. Returns [T, H, ncl] float32."""
    h, ncl = mean.shape[0], mean.shape[1]
    out = torch.empty(len(tiles), h, ncl, dtype=torch.float32, device=mean.device)
    per_pass = max(1, _MAX_SCORE_ELEMENTS // max(1, h * ncl))
    i = 0
    while i < len(tiles):  # group tiles so one pass scores at most per_pass queries
        j, rows = i, 0
        while j < len(tiles) and (j == i or rows + tiles[j].q_len <= per_pass):
            rows += tiles[j].q_len
            j += 1
        lo = tiles[i].q_start - q_offset
        s = torch.bmm(qsum[lo:lo + rows].transpose(0, 1), mean.transpose(1, 2))  # [H, rows, ncl]
        r = 0
        for t in range(i, j):
            out[t] = s[:, r:r + tiles[t].q_len].amax(dim=1)
            r += tiles[t].q_len
        i = j
    return out


def routed_region_sizes(table: ClusterTable, tiles: list[Tile]) -> torch.Tensor:
    """Members of each cluster inside each tile's routed region [sink_tokens, local_lo): [T, H, ncl] int64.

    Only clusters of segments reaching past the lowest local_lo lose members at the top; their perm entries are
    the tail from that segment on, so only that tail is scanned."""
    ncl, s = table.num_clusters, table.segment_tokens
    base = (table.size[:, :ncl] - table.pre_sink[:, :ncl]).long()  # [H, ncl]
    lo = torch.tensor([t.local_lo for t in tiles], device=table.device)
    tail_start = (min(t.local_lo for t in tiles) // s) * s
    tail_pos = table.perm[:, tail_start:table.num_members].long()  # [H, L]
    tail_cid = table.cid[:, tail_start:table.num_members].long()
    above = (tail_pos.unsqueeze(0) >= lo[:, None, None]).long()  # [T, H, L]
    lost = torch.zeros(len(tiles), table.heads, ncl, dtype=torch.long, device=table.device)
    lost.scatter_add_(2, tail_cid.unsqueeze(0).expand_as(above), above)
    eff = base.unsqueeze(0) - lost
    no_room = torch.tensor([t.local_lo <= table.sink_tokens for t in tiles], device=table.device)
    return eff.clamp_min(0).masked_fill(no_room[:, None, None], 0)


def route_sequence(table: ClusterTable, qsum: torch.Tensor, tiles: list[Tile], q_offset: int,
                   capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed positions of one sequence's tiles: (routed [T, H, L] int32 with -1 padding, counts [T, H] int32).

    capacity L: the padded width; None = exactly the largest count (a host sync; fine on CPU). Without a sync
    budget + segment_tokens always suffices: clusters are taken while below the budget and one cluster holds
    at most a segment."""
    dev, h, T = table.device, table.heads, len(tiles)
    ncl = table.num_clusters
    if ncl == 0 or T == 0:
        return (torch.full((T, h, 0), -1, dtype=torch.int32, device=dev),
                torch.zeros(T, h, dtype=torch.int32, device=dev))
    eff = routed_region_sizes(table, tiles)  # [T, H, ncl]
    scores = tile_scores(qsum, tiles, q_offset, table.mean[:, :ncl])
    scores = scores.masked_fill(eff == 0, float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    eff_sorted = eff.gather(2, order)
    cum = torch.cumsum(eff_sorted, dim=-1)
    budget = torch.tensor([t.budget for t in tiles], device=dev)[:, None, None]
    taken = ((cum - eff_sorted) < budget) & (eff_sorted > 0)
    run_len = eff_sorted * taken
    run_end = torch.cumsum(run_len, dim=-1)  # [T, H, ncl]
    counts = run_end[..., -1]
    if capacity is None:
        capacity = int(counts.max())
    # The kept members of a cluster are the contiguous run after its members below the sinks.
    first_kept = (table.start[:, :ncl] + table.pre_sink[:, :ncl]).long()  # [H, ncl]
    run_first = first_kept.unsqueeze(0).expand(T, h, ncl).gather(2, order)
    slot = torch.arange(capacity, device=dev).expand(T, h, capacity).contiguous()
    run = torch.searchsorted(run_end, slot, right=True).clamp_max(ncl - 1)  # which run each slot falls in
    within = slot - (run_end.gather(2, run) - run_len.gather(2, run))
    src = run_first.gather(2, run) + within
    valid = slot < counts.unsqueeze(-1)
    src = torch.where(valid, src, torch.zeros_like(src))
    positions = table.perm.unsqueeze(0).expand(T, h, -1).gather(2, src)  # int32, no copy of perm
    routed = torch.where(valid, positions, torch.full_like(positions, -1))
    return routed, counts.to(torch.int32)


def group_query_sums(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [M, Hq, D] -> [M, Hkv, D] float32: each GQA group's queries summed."""
    m, hq, d = q.shape
    return q.float().reshape(m, num_kv_heads, hq // num_kv_heads, d).sum(dim=2)


# ---------------------------------------------------------------- attention over the selection

def _key_rows(cache: torch.Tensor, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """cache[blocks, heads, offsets] (indices broadcast; [..., D]) of a [num_blocks, Hkv, bs, D] cache: one
    index_select of rows when the cache is contiguous (the engine's; several times faster than advanced
    indexing on the CPU), advanced indexing otherwise (vLLM's K and V are strided views of one tensor)."""
    if not cache.is_contiguous():
        return cache[blocks, heads, offsets]
    _, hkv, bs, d = cache.shape
    rows = ((blocks * hkv + heads) * bs + offsets).view(-1)
    return cache.view(-1, d).index_select(0, rows).view(*torch.broadcast_shapes(blocks.shape, heads.shape), d)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           selection: RoutingSelection, scale: float | None = None, return_lse: bool = False):
    """Causal attention of every step token over its tile's selection. q [T, Hq, D] -> [T, Hq, D] (q's dtype);
    with return_lse also the log-sum-exp [T, Hq] float32 (natural log, scaled logits)."""
    ntok, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    lse_out = torch.empty(ntok, hq, dtype=torch.float32, device=q.device)
    heads = torch.arange(hkv, device=q.device)
    for t, tile in enumerate(selection.tiles):
        width = int(selection.routed_count[t].max()) if selection.routed.shape[2] else 0
        dev = q.device
        sinks = torch.arange(tile.sink_end, device=dev).expand(hkv, -1)
        local = torch.arange(tile.local_lo, tile.last_pos + 1, device=dev).expand(hkv, -1)
        pos = torch.cat([sinks, selection.routed[t, :, :width].long(), local], dim=1)  # [H, N]
        valid = pos >= 0
        safe = pos.clamp_min(0)
        blocks = block_tables[tile.seq][torch.div(safe, bs, rounding_mode="floor")].long()
        k = _key_rows(k_cache, blocks, heads[:, None], safe % bs)  # [H, N, D]
        v = _key_rows(v_cache, blocks, heads[:, None], safe % bs)
        qpos = torch.arange(tile.first_pos, tile.last_pos + 1, device=dev)
        mask = valid[:, None, :] & (pos[:, None, :] <= qpos[None, :, None])  # [H, M, N]
        qt = q[tile.q_start:tile.q_start + tile.q_len]
        o, lse = attention_with_lse(qt.transpose(0, 1), k, v, mask.repeat_interleave(group, dim=0), scale)
        out[tile.q_start:tile.q_start + tile.q_len] = o.transpose(0, 1).to(q.dtype)
        lse_out[tile.q_start:tile.q_start + tile.q_len] = lse.transpose(0, 1)
    return (out, lse_out) if return_lse else out
