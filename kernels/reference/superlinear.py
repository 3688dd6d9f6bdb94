"""PyTorch reference for superlinear span attention (arXiv 2601.18401, N = 2): span search + span attention.

Notation (see docs/superlinear.md): a query at absolute position q has t = q + 1; p = search_power,
ps = span_power, b = backward_factor, f = forward_factor, k = num_spans.

- Stripe offsets off(s) = floor(s^(1/p)) (exact integer powers when 1/p is an integer). The query
  searches the stripes s >= sw_index + 1 with off(s) <= t (the published rule), anchor
  a_s = q - off(s) + 1 = t - off(s) >= 0. Validity is decided on integers from a table of off(s).
- Local window W = off(sw_index + 1) - 1 keys [q - W + 1, q] (clamped at 0). A query without a valid
  stripe (q < W) gets plain causal attention: its window is widened to [0, q].
- Span of anchor a: [max(0, a - ceil(b t^ps)), min(a + ceil(f t^ps), q, sw_start - 1)] (inclusive).
- Search: "anchor" scores a span by q_search . K[a]; "summary" by the largest Quest upper bound of q . k
  over the key blocks the span touches. Top-k spans per query head (ties: the smaller stripe first).
  span_align "block" (summary only): one candidate per best block (its smallest stripe), and each selected
  span, of the same length, is centred on its best block instead of its anchor.
- Combine: "gate" = sum_j softmax(scores)_j * attention(span_j + window); "union" = attention over the
  union of the selected spans and the window, each key once.

This module is the oracle for the Triton kernels and the engine's CPU path. Everything is vectorised over
heads, queries and stripes; queries are processed in tiles only to bound memory.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..base import BackendError
from ..params import choice_param, int_param, number_param
from . import dense as dense_ref
from .block_summaries import block_bounds, quest_bound

COMBINES = ("gate", "union")
SEARCHES = ("anchor", "summary")
SCORES = ("bound", "mean")  # summary search: a block's Quest bound, or q . its mean key
ALIGNS = ("anchor", "block")  # where a selected span sits: at its stripe's anchor, or centred on its best block

# Keep the largest [.., q_tile, keys] tensors under about this many elements.
_MAX_TILE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SpanParams:
    sw_index: int = 63
    num_spans: int = 3
    backward_factor: float = 2.0
    forward_factor: float = 1.0
    search_power: float = 0.5
    span_power: float = 0.5
    combine: str = "gate"
    search: str = "anchor"
    sink_tokens: int = 0  # union only: keys [0, sink_tokens) always attended (attention sinks)
    score: str = "bound"  # summary search's block score: "bound" (Quest) or "mean" (q . mean key)
    span_align: str = "anchor"  # summary only: "block" centres each span on its best block, one span per block

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        int_param("superlinear", values, "sw_index", 0)
        int_param("superlinear", values, "num_spans", 1)
        for name in ("search_power", "span_power"):
            number_param("superlinear", values, name, 0.0, 1.0, open_low=True, open_high=True)
        for name in ("backward_factor", "forward_factor"):
            number_param("superlinear", values, name, 0.0)
        choice_param("superlinear", values, "combine", COMBINES)
        choice_param("superlinear", values, "search", SEARCHES)
        int_param("superlinear", values, "sink_tokens", 0)
        choice_param("superlinear", values, "score", SCORES)
        choice_param("superlinear", values, "span_align", ALIGNS)
        if self.span_align == "block" and self.search != "summary":
            raise BackendError("superlinear: span_align 'block' needs search 'summary' (anchor search scores no blocks)")
        if self.sink_tokens and self.combine != "union":
            raise BackendError("superlinear: sink_tokens needs combine 'union' (the gate mixes spans only)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def first_stripe(self) -> int:
        return self.sw_index + 1

    @property
    def window(self) -> int:
        """W: the local window covers keys [q - W + 1, q]."""
        return stripe_offset(self.first_stripe, self.search_power) - 1

    @property
    def structurally_complete(self) -> bool:
        """The paper's sufficient condition for structural non-exclusion (every earlier key in some
        candidate span or the window): p + ps >= 1 and b >= 1/p."""
        return self.search_power + self.span_power >= 1.0 and self.backward_factor >= 1.0 / self.search_power


# ----------------------------------------------------------------------------------------- geometry

def inverse_integer(power: float) -> int | None:
    """n when power == 1/n for an integer n (then powers are computed exactly in integers)."""
    n = round(1.0 / power)
    return n if n >= 1 and abs(1.0 / power - n) < 1e-9 else None


def stripe_offset(s: int, search_power: float) -> int:
    """off(s) = floor(s^(1/p)): the anchor of stripe s sits off(s) - 1 keys before the query."""
    n = inverse_integer(search_power)
    return s ** n if n is not None else math.floor(s ** (1.0 / search_power))


@functools.lru_cache(maxsize=64)
def _stripe_offsets(search_power: float, max_t: int) -> tuple[int, ...]:
    """off(s) for s = 0, 1, ... while off(s) <= max_t (strictly increasing for s >= 1 since 1/p > 1)."""
    offs = [0]
    s = 1
    while stripe_offset(s, search_power) <= max_t:
        offs.append(stripe_offset(s, search_power))
        s += 1
    return tuple(offs)


def _bucket(max_t: int) -> int:
    """max_t rounded up to a power of two, so tables are shared across decode steps."""
    return max(1, 1 << max(0, int(max_t) - 1).bit_length())


def stripe_table(search_power: float, max_t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] int64 off(s) = floor(s^(1/p)) for stripes s = 0 .. n-1 with off(s) <= max_t (rounded up to a
    power of two). Stripe s is valid for t = q + 1 iff s >= sw_index + 1 and off(s) <= t: the published
    rule floor(s^(1/p)) <= q + 1 (so a_s = t - off(s) >= 0). Cached per bucket: callers only read it."""
    return _stripe_tensor(float(search_power), _bucket(max_t), str(device))


@functools.lru_cache(maxsize=64)
def _stripe_tensor(search_power: float, bucket: int, device: str) -> torch.Tensor:
    return torch.tensor(_stripe_offsets(search_power, bucket), dtype=torch.int64, device=device)


def num_valid_stripes(t: int, params: SpanParams) -> int:
    """How many stripes a query with t = q + 1 searches: s = sw_index+1, ... while floor(s^(1/p)) <= t."""
    offs = _stripe_offsets(float(params.search_power), _bucket(t))
    last = bisect.bisect_right(offs, t) - 1
    return max(0, last - params.sw_index)


def span_reach(t: torch.Tensor, power: float, factor: float) -> torch.Tensor:
    """ceil(factor * t^power) for an integer tensor t (int64 result), with exact roots when power = 1/n."""
    tf = t.to(torch.float64)
    root = torch.sqrt(tf) if power == 0.5 else tf.pow(power)
    n = inverse_integer(power)
    if n is not None:  # t a perfect n-th power: use the exact integer root so ceil() sees an exact value
        r = torch.round(root)
        root = torch.where(r.pow(n) == tf, r, root)
    return torch.ceil(factor * root).to(torch.int64)


@dataclass
class SpanGeometry:
    """Per query (leading shape [M]) and stripe (trailing [S]): everything the search needs."""

    anchors: torch.Tensor  # [M, S] int64, anchor position (may be < 0: invalid)
    valid: torch.Tensor  # [M, S] bool
    starts: torch.Tensor  # [M, S] int64, first key of the span (inclusive)
    ends: torch.Tensor  # [M, S] int64, last key of the span (inclusive)
    sw_start: torch.Tensor  # [M] int64, first key of the local window


def span_geometry(positions: torch.Tensor, params: SpanParams, num_stripes: int) -> SpanGeometry:
    """Anchors and spans of stripes first_stripe .. first_stripe + num_stripes - 1 for queries at positions."""
    pos = positions.to(torch.int64)
    t = pos + 1
    table = stripe_table(params.search_power, int(t.max()) if t.numel() else 1, pos.device)
    s = torch.arange(params.first_stripe, params.first_stripe + num_stripes, device=pos.device)
    in_table = s < table.shape[0]
    s_off = torch.where(in_table, table[s.clamp_max(table.shape[0] - 1)], torch.full_like(s, 1 << 62))
    anchors = t[:, None] - s_off[None, :]
    valid = s_off[None, :] <= t[:, None]
    # A query without any valid stripe gets plain causal attention: its "window" starts at key 0.
    sw_start = torch.where(valid.any(1), (pos - params.window + 1).clamp_min(0), torch.zeros_like(pos))
    back = span_reach(t, params.span_power, params.backward_factor)
    fwd = span_reach(t, params.span_power, params.forward_factor)
    starts = (anchors - back[:, None]).clamp_min(0)
    ends = torch.minimum(anchors + fwd[:, None], torch.minimum(pos, sw_start - 1)[:, None])
    return SpanGeometry(anchors, valid, starts, ends, sw_start)


# A tile of at most this many queries counts as decode: its geometry is cached (every layer of a forward pass
# searches from the same positions) and it attends over key blocks (attend_blocks).
_DECODE_QUERIES = 4


def decode_geometry(positions: torch.Tensor, params: SpanParams, num_stripes: int) -> SpanGeometry:
    """span_geometry, cached by the (few) positions: callers only read the tensors."""
    return _cached_geometry(tuple(positions.tolist()), params, num_stripes, str(positions.device))


@functools.lru_cache(maxsize=256)
def _cached_geometry(positions: tuple[int, ...], params: SpanParams, num_stripes: int, device: str) -> SpanGeometry:
    return span_geometry(torch.tensor(positions, dtype=torch.int64, device=device), params, num_stripes)


# ------------------------------------------------------------------------------------------- search

def summary_table_names(params: SpanParams) -> tuple[str, ...]:
    """The aux tables (per block and KV head) summary search reads: kmin/kmax ("bound") or kmean ("mean")."""
    if params.search != "summary":
        return ()
    return ("kmin", "kmax") if params.score == "bound" else ("kmean",)


def summary_tables(k: torch.Tensor, params: SpanParams, block_size: int) -> tuple[torch.Tensor, ...]:
    """The per-block tables summary search reads, from contiguous keys k [Hkv, N, D]: (kmin, kmax) for
    score "bound", (kmean,) for score "mean" (each [Hkv, nb, D]; the last block may be partial)."""
    if params.score == "bound":
        return block_bounds(k, block_size)
    hkv, n, d = k.shape
    nb = (n + block_size - 1) // block_size
    kf = k.float() if k.dtype != torch.float64 else k
    sums = torch.nn.functional.pad(kf, (0, 0, 0, nb * block_size - n)).view(hkv, nb, block_size, d).sum(2)
    counts = torch.full((nb,), block_size, dtype=kf.dtype, device=k.device)
    counts[-1] = n - (nb - 1) * block_size
    return (sums / counts[None, :, None],)


def block_scores(qs: torch.Tensor, tables: tuple[torch.Tensor, ...], score: str) -> torch.Tensor:
    """[Hq, M, nb] score of every block for queries qs [Hq, M, D]: the Quest bound from (kmin, kmax), or
    q . mean key from (kmean,) (tables [Hkv, nb, D], query head h reads KV head h // group)."""
    if score == "bound":
        return quest_bound(qs, *tables)
    hq, m, d = qs.shape
    kmean = tables[0]
    hkv = kmean.shape[0]
    return torch.bmm(qs.reshape(hkv, (hq // hkv) * m, d), kmean.transpose(1, 2)).reshape(hq, m, -1)


def range_max(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max(values[..., lo:hi+1]) along the last axis for index tensors lo/hi [..., S] (same leading shape
    as values), via a sparse table (log2 levels of doubling maxima, only up to the longest range asked)."""
    n = values.shape[-1]
    longest = int((hi - lo + 1).max()) if lo.numel() else 1
    levels = [values]
    width = 1
    while 2 * width <= min(n, longest):
        prev = levels[-1]
        shifted = torch.nn.functional.pad(prev[..., width:], (0, width), value=float("-inf"))
        levels.append(torch.maximum(prev, shifted))
        width *= 2
    table = torch.stack(levels)  # [levels, ..., n]
    length = (hi - lo + 1).clamp_min(1)
    level = torch.floor(torch.log2(length.to(torch.float64))).to(torch.int64)
    level = torch.where((1 << (level + 1)) <= length, level + 1, level)  # guard log2 rounding
    level = torch.where((1 << level) > length, level - 1, level).clamp(0, len(levels) - 1)
    lo_c = lo.clamp(0, n - 1)
    hi_start = (hi - (1 << level) + 1).clamp(0, n - 1)
    flat = table.reshape(len(levels), -1, n)
    lead = flat.shape[1]
    idx_level = level.reshape(lead, -1)
    rows = torch.arange(lead, device=values.device)[:, None].expand_as(idx_level)
    a = flat[idx_level, rows, lo_c.reshape(lead, -1)]
    b = flat[idx_level, rows, hi_start.reshape(lead, -1)]
    return torch.maximum(a, b).reshape(lo.shape)


def first_index_of(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The leftmost index i in [lo, hi] with values[..., i] == target (the range's maximum, from range_max),
    for index tensors lo/hi/target [..., S] (same leading shape as values); lo where there is none."""
    n = values.shape[-1]
    width = int((hi - lo + 1).max()) if lo.numel() else 1
    step = torch.arange(max(width, 1), device=values.device)
    idx = (lo[..., None] + step).clamp(0, n - 1)  # [..., S, width]
    got = torch.gather(values, -1, idx.flatten(-2)).view(idx.shape)
    hit = (got == target[..., None]) & (step <= (hi - lo)[..., None])
    return lo + hit.to(torch.int32).argmax(-1)  # argmax gives the first of equal maxima


@dataclass(frozen=True)
class KeyRows:
    """A key (or value) source: rows(heads, positions) gives the rows of those KV heads at those
    positions, broadcasting heads against positions and appending D. Contiguous [Hkv, N, D] tensors and
    one sequence of the paged cache both provide one, so the search and the gathered attention serve both."""

    fetch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_kv_heads: int

    def __call__(self, heads: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.fetch(heads, positions)


def contiguous_rows(x: torch.Tensor) -> KeyRows:
    """Rows of a contiguous [Hkv, N, D] tensor."""
    return KeyRows(lambda heads, pos: x[heads, pos], x.shape[0])


def paged_rows(cache: torch.Tensor, block_table: torch.Tensor) -> KeyRows:
    """Rows of one sequence in a paged cache [num_blocks, Hkv, block_size, D] (head-major blocks)."""
    bs = cache.shape[2]
    table = block_table.long()
    return KeyRows(lambda heads, pos: cache[table[pos // bs], heads, pos % bs], cache.shape[1])


def search_scores(qs: torch.Tensor, k: torch.Tensor | KeyRows, geom: SpanGeometry, params: SpanParams, *,
                  bounds: tuple[torch.Tensor, torch.Tensor] | None, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Search score of every (query head, query, stripe): [Hq, M, S] (-inf where the stripe is invalid), and
    with span_align "block" the span's best block (the leftmost block of that score; else None).

    qs [Hq, M, D], k [Hkv, N, D] (or a key source: rows(heads, positions)). Anchor search: raw
    qs . K[anchor]. Summary search: max over the blocks the span touches of the block score (bounds = the
    per-block tables [Hkv, nb, D] of `summary_tables`; computed from k when None and k is a tensor)."""
    hq, m, d = qs.shape
    acc = torch.float64 if qs.dtype == torch.float64 else torch.float32
    qf = qs.to(acc)
    if params.search == "anchor":
        rows = contiguous_rows(k) if isinstance(k, torch.Tensor) else k
        hkv = rows.num_kv_heads
        kv_heads = torch.arange(hkv, device=qs.device)[:, None, None]
        keys = rows(kv_heads, geom.anchors.clamp_min(0)[None]).to(acc)  # [Hkv, M, S, D]
        scores = torch.einsum("hgmd,hmsd->hgms", qf.view(hkv, hq // hkv, m, d), keys).reshape(hq, m, -1)
        best = None
    else:
        if bounds is None:
            if not isinstance(k, torch.Tensor):
                raise ValueError("summary search over a key source needs the block bounds")
            bounds = summary_tables(k, params, block_size)
        ub = block_scores(qf, tuple(b.to(acc) for b in bounds), params.score)  # [Hq, M, nb]
        lo = (geom.starts // block_size)[None].expand(hq, -1, -1)
        hi = (geom.ends.clamp_min(0) // block_size)[None].expand(hq, -1, -1)
        scores = range_max(ub, lo, hi)
        best = first_index_of(ub, lo, hi, scores) if params.span_align == "block" else None
    return scores.masked_fill(~geom.valid[None], float("-inf")), best


@dataclass
class Selection:
    """The top-k spans of each (query head, query): [Hq, M, K] each (K = min(num_spans, stripes))."""

    stripes: torch.Tensor  # int64 stripe number (s), meaningful where valid
    scores: torch.Tensor  # search score (-inf where invalid)
    valid: torch.Tensor  # bool
    starts: torch.Tensor  # int64 first key (inclusive)
    ends: torch.Tensor  # int64 last key (inclusive)


def select_spans(qs: torch.Tensor, k: torch.Tensor | KeyRows, positions: torch.Tensor, params: SpanParams, *,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None, block_size: int = 64,
                 ) -> tuple[Selection, torch.Tensor]:
    """Span search for queries qs [Hq, M, D] at positions [M] over keys k [Hkv, N, D]. Returns the
    selection and the window starts [M]."""
    m = positions.shape[0]
    t_max = int(positions.max()) + 1 if m else 1
    num_stripes = max(num_valid_stripes(t_max, params), 1)
    geom = decode_geometry(positions, params, num_stripes) if m <= _DECODE_QUERIES else \
        span_geometry(positions, params, num_stripes)
    best = None
    if num_valid_stripes(t_max, params):
        scores, best = search_scores(qs, k, geom, params, bounds=bounds, block_size=block_size)
    else:  # no query has a valid stripe (short contexts): every score is -inf, so skip the search
        scores = torch.full((qs.shape[0], m, num_stripes), float("-inf"), device=qs.device,
                            dtype=torch.float64 if qs.dtype == torch.float64 else torch.float32)
    aligned = params.span_align == "block" and best is not None
    if aligned:
        scores = one_stripe_per_block(scores, best)
    kk = min(params.num_spans, num_stripes)
    # Ties (common with summary search: neighbouring spans share their best block) go to the smaller
    # stripe, i.e. the anchor nearer the query: a stable descending sort keeps that order.
    top, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    top, idx = top[..., :kk], idx[..., :kk]  # [Hq, M, K]
    hq = qs.shape[0]

    def pick(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x[None].expand(hq, -1, -1), 2, idx)

    if aligned:
        starts, ends = centred_spans(torch.gather(best, 2, idx), positions, geom.sw_start, params, block_size)
    else:
        starts, ends = pick(geom.starts), pick(geom.ends)
    sel = Selection(stripes=idx + params.first_stripe, scores=top, valid=torch.isfinite(top),
                    starts=starts, ends=ends)
    if params.sink_tokens:
        sel = with_sinks(sel, geom.sw_start, params.sink_tokens)
    return sel, geom.sw_start


def one_stripe_per_block(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """span_align "block": stripes sharing a best block (so the same score) would centre the same span; keep
    the smallest of them (the anchor nearer the query) and give the others -inf. scores, best [Hq, M, S]."""
    num = scores.shape[-1]
    stripe = torch.arange(num, device=scores.device).expand_as(best)
    dummy = int(best.max()) + 1  # the bin of invalid stripes
    bins = torch.where(torch.isfinite(scores), best, dummy)
    first = torch.full((*scores.shape[:-1], dummy + 1), num, dtype=torch.int64, device=scores.device)
    first = first.scatter_reduce(2, bins, stripe, "amin")
    return scores.masked_fill(torch.gather(first, 2, bins) != stripe, float("-inf"))


def centred_spans(blocks: torch.Tensor, positions: torch.Tensor, sw_start: torch.Tensor, params: SpanParams,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """span_align "block": spans of the stripes' length (ceil(b t^ps) + ceil(f t^ps) + 1 keys) centred on the
    middle key of each selected best block blocks [Hq, M, K], moved inside [0, min(q, sw_start - 1)].
    Returns the first and last keys (inclusive)."""
    pos = positions.to(torch.int64)
    t = pos + 1
    reach = (span_reach(t, params.span_power, params.backward_factor)
             + span_reach(t, params.span_power, params.forward_factor))[None, :, None]
    last = torch.minimum(pos, sw_start - 1)[None, :, None]
    centre = blocks * block_size + block_size // 2
    start = torch.minimum(centre - reach // 2, last - reach).clamp_min(0)
    return start, torch.minimum(start + reach, last)


def with_sinks(sel: Selection, sw_start: torch.Tensor, sink_tokens: int) -> Selection:
    """Union mode: keys [0, min(sink_tokens, sw_start)) join the selection as one more span (stripe 0, the
    last slot) and the searched spans start after them, so no key counts twice. Queries whose window reaches
    key 0 get an empty sink span."""
    hq = sel.starts.shape[0]
    sink_end = sw_start.clamp(max=sink_tokens)[None, :, None].expand(hq, -1, 1)  # [Hq, M, 1], exclusive
    zeros = torch.zeros_like(sink_end)
    return Selection(stripes=torch.cat([sel.stripes, zeros], -1),
                     scores=torch.cat([sel.scores, torch.full(sink_end.shape, float("inf"), dtype=sel.scores.dtype,
                                                              device=sel.scores.device)], -1),
                     valid=torch.cat([sel.valid, sink_end > 0], -1),
                     starts=torch.cat([torch.maximum(sel.starts, sink_end), zeros], -1),
                     ends=torch.cat([sel.ends, sink_end - 1], -1))


# ---------------------------------------------------------------------------------------- attention

def _masked_attention(scores: torch.Tensor, mask: torch.Tensor | None, v: torch.Tensor, hkv: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores masked) @ v. scores [Hq, M, N], mask broadcastable (None: every key), v [Hkv, N, D].
    Returns out [Hq, M, D] and lse [Hq, M]."""
    hq, m, n = scores.shape
    s = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    out = torch.bmm(probs.reshape(hkv, (hq // hkv) * m, n), v.to(probs.dtype)).reshape(hq, m, -1)
    return out, lse


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, sel: Selection,
           sw_start: torch.Tensor, combine: str, scale: float) -> torch.Tensor:
    """Span attention of q [Hq, M, D] given the selection. Keys k/v [Hkv, N, D] at positions 0..N-1.
    Returns [Hq, M, D] in the accumulation dtype (float32, or float64 for float64 inputs)."""
    hq, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    key = torch.arange(n, device=q.device)
    pos = positions.to(torch.int64)
    window = ((key[None, :] >= sw_start[:, None]) & (key[None, :] <= pos[:, None]))[None]  # [1, M, N]
    in_span = (sel.valid[..., None] & (key >= sel.starts[..., None]) & (key <= sel.ends[..., None]))  # [Hq,M,K,N]
    qf = q.to(acc).reshape(hkv, (hq // hkv) * m, d)
    scores = torch.bmm(qf, k.to(acc).transpose(1, 2)).reshape(hq, m, n) * scale
    if combine == "union":
        out, _ = _masked_attention(scores, window | in_span.any(2), v, hkv)
        return out
    return _gate_combine(scores, window, in_span, sel, v, hkv)


def _gate_combine(scores: torch.Tensor, window: torch.Tensor, in_span: torch.Tensor, sel: Selection, v: torch.Tensor,
                  hkv: int) -> torch.Tensor:
    """Gate mode: each span attends together with the window; the outputs are mixed by a softmax over the
    search scores. scores [Hq, M, N], window [1 or Hq, M, N] and in_span [Hq, M, K, N] masks, v [Hkv, N, D]."""
    gates = torch.softmax(sel.scores, dim=-1)
    any_span = sel.valid.any(-1)
    gates = torch.where(any_span[..., None], gates, torch.zeros_like(gates))
    out = torch.zeros(*scores.shape[:2], v.shape[2], dtype=scores.dtype, device=scores.device)
    for j in range(sel.valid.shape[-1]):  # num_spans (small): one masked attention per span slot
        o_j, _ = _masked_attention(scores, window | in_span[:, :, j], v, hkv)
        out += gates[..., j, None] * o_j
    o_w, _ = _masked_attention(scores, window, v, hkv)  # queries without any valid stripe: the window
    return torch.where(any_span[..., None], out, o_w)


def attend_gathered(q: torch.Tensor, k: KeyRows, v: KeyRows, positions: torch.Tensor, sel: Selection,
                    sw_start: torch.Tensor, combine: str, scale: float) -> torch.Tensor:
    """Span attention reading only the keys it attends: the window and the selected spans are gathered
    (per query head) from the key sources, so the cost follows the attended keys, not the context.
    Same result as `attend`. q [Hq, M, D]; returns [Hq, M, D] in the accumulation dtype."""
    hq, m, d = q.shape
    hkv = k.num_kv_heads
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = positions.to(torch.int64)
    starts, ends, valid = sel.starts, sel.ends, sel.valid
    if combine == "union":
        # spans ordered by anchor have ordered starts and ends: clip each to begin after the ones before it
        order = torch.argsort(torch.where(valid, starts, torch.full_like(starts, 1 << 62)), dim=-1)
        starts, ends, valid = (torch.gather(x, 2, order) for x in (starts, ends, valid))
        prev_end = torch.cummax(torch.where(valid, ends, torch.full_like(ends, -1)), dim=-1).values
        prev_end = torch.nn.functional.pad(prev_end[..., :-1], (1, 0), value=-1)
        starts = torch.maximum(starts, prev_end + 1)
    span_len = torch.where(valid, (ends - starts + 1).clamp_min(0), torch.zeros_like(starts))  # [Hq, M, K]
    win_len = pos - sw_start + 1  # [M]
    w_max, s_max = int(win_len.max()), int(span_len.max())
    num = span_len.shape[-1]
    w_off = torch.arange(w_max, device=dev)
    s_off = torch.arange(s_max, device=dev)
    w_idx = (sw_start[:, None] + w_off)[None].expand(hq, -1, -1)  # [Hq, M, W]
    w_ok = (w_off < win_len[:, None])[None].expand(hq, -1, -1)
    s_idx = (starts[..., None] + s_off).reshape(hq, m, num * s_max)  # [Hq, M, K * S]
    s_ok = (s_off < span_len[..., None]).reshape(hq, m, num * s_max)
    idx = torch.cat([w_idx, s_idx], -1)
    ok = torch.cat([w_ok, s_ok], -1)
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    kv_heads = (torch.arange(hq, device=dev) // (hq // hkv))[:, None, None]
    keys = k(kv_heads, idx).to(acc)  # [Hq, M, L, D]
    values = v(kv_heads, idx).to(acc)
    scores = torch.einsum("hmd,hmld->hml", q.to(acc), keys) * scale

    def softmax_out(mask: torch.Tensor) -> torch.Tensor:
        s = scores.masked_fill(~mask, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        return torch.einsum("hml,hmld->hmd", p, values)

    if combine == "union":
        return softmax_out(ok)
    slot = torch.cat([torch.full((w_max,), -1, device=dev), torch.arange(num, device=dev).repeat_interleave(s_max)])
    in_window = ok & (slot == -1)
    gates = torch.softmax(sel.scores, dim=-1)
    any_span = sel.valid.any(-1)
    out = torch.zeros(hq, m, d, dtype=acc, device=dev)
    for j in range(num):  # num_spans (small)
        o_j = softmax_out(in_window | (ok & (slot == j)))
        out += torch.where(any_span[..., None], gates[..., j, None], 0.0) * o_j
    return torch.where(any_span[..., None], out, softmax_out(in_window))


@dataclass
class PagedSpans:
    """One sequence's span selection over the paged cache: (first, end, selection, window starts) per tile
    of queries [first, end). What a COMPUTE layer hands to its REUSE layers (the tiling depends only on the
    shapes and parameters, which a reuse layer shares)."""

    tiles: list[tuple[int, int, Selection, torch.Tensor]]


def paged_span_select(qs: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                      params: SpanParams, *, bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> PagedSpans:
    """The span search of one sequence's queries qs [Hq, M, D] at positions [M] over the paged cache (reads
    the anchors, or the per-block bounds [Hkv, nb, D] for summary search), in tiles of queries."""
    hq, m, d = qs.shape
    if m == 0:
        return PagedSpans([])
    keys = paged_rows(k_cache, block_table)
    tile = 1 if m == 1 else _select_tile(qs.shape, int(positions.max()) + 1, params, bounds)
    tiles = []
    for s in range(0, m, tile):
        e = min(m, s + tile)
        sel, sw_start = select_spans(qs[:, s:e], keys, positions[s:e], params, bounds=bounds,
                                     block_size=k_cache.shape[2])
        tiles.append((s, e, sel, sw_start))
    return PagedSpans(tiles)


def _select_tile(shape: torch.Size, t_max: int, params: SpanParams, bounds: tuple[torch.Tensor, ...] | None) -> int:
    """Queries per tile of the paged search, so its largest tensors stay under _MAX_TILE_ELEMENTS."""
    hq, _, d = shape
    stripes = max(num_valid_stripes(t_max, params), 1)
    t = torch.tensor([t_max])
    span = int(span_reach(t, params.span_power, params.backward_factor) + span_reach(t, params.span_power,
                                                                                      params.forward_factor)) + 1
    attended = params.window + 1 + params.num_spans * span
    nb = 0 if bounds is None else bounds[0].shape[1]
    per_query = hq * max(attended * (d + 4), stripes * (d + 8), nb * 24)
    return max(1, _MAX_TILE_ELEMENTS // max(1, per_query))


def paged_span_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      positions: torch.Tensor, spans: PagedSpans, combine: str, scale: float | None = None
                      ) -> torch.Tensor:
    """Attention of one sequence's queries q [Hq, M, D] over the spans and windows of a selection, reading
    only the attended keys. Returns [Hq, M, D] (q's dtype)."""
    hq, m, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    keys = paged_rows(k_cache, block_table)
    values = paged_rows(v_cache, block_table)
    out = torch.empty(hq, m, d, dtype=q.dtype, device=q.device)
    for s, e, sel, sw_start in spans.tiles:
        pos = positions[s:e]
        if e - s <= _BLOCK_QUERIES:
            out[:, s:e] = attend_blocks(q[:, s:e], k_cache, v_cache, block_table, pos, sel, sw_start, combine,
                                        scale).to(q.dtype)
            continue
        visible = int(pos.max()) + 1
        if not bool(sel.valid.any()) or (combine == "union" and
                                          visible <= _CONTIGUOUS_FACTOR * _attended_bound(sel, sw_start, pos)):
            # Short contexts (and tiles without any stripe, which attend causally to [0, q] in both modes): one
            # fused masked attention over the contiguous keys costs less than gathering every attended key per
            # query and head.
            k_ctx, v_ctx = (dense_ref.gather_kv(c, block_table, visible) for c in (k_cache, v_cache))
            out[:, s:e] = attend_union_contiguous(q[:, s:e], k_ctx, v_ctx, pos, sel, sw_start, scale).to(q.dtype)
        else:
            out[:, s:e] = attend_gathered(q[:, s:e], keys, values, pos, sel, sw_start, combine, scale).to(q.dtype)
    return out


# Tiles of at most this many queries (decode) read each KV head's touched key blocks (attend_blocks); longer
# tiles (sparse prefill), whose queries together touch most blocks, take one of the paths below.
_BLOCK_QUERIES = _DECODE_QUERIES

# The contiguous union path is taken while the visible keys are at most this many times the attended ones
# (a gathered key costs several times a key of a dense masked product on the CPU).
_CONTIGUOUS_FACTOR = 4


def _attended_bound(sel: Selection, sw_start: torch.Tensor, positions: torch.Tensor) -> int:
    """An upper bound of the keys one query of the tile attends (window plus its spans)."""
    spans = torch.where(sel.valid, sel.ends - sel.starts + 1, torch.zeros_like(sel.starts)).sum(-1)
    return int((positions.to(torch.int64) - sw_start + 1).max()) + int(spans.max())


def attended_counts(sel: Selection, sw_start: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[Hq, M] int64: the distinct keys each query head attends in union mode (its window and its valid
    spans, overlaps counted once), for reports of the share of keys attended."""
    hq = sel.starts.shape[0]
    pos = positions.to(torch.int64)
    window = torch.stack([sw_start, pos], -1)[None, :, None].expand(hq, -1, -1, -1)  # [Hq, M, 1, 2]
    spans = torch.stack([torch.where(sel.valid, sel.starts, 1), torch.where(sel.valid, sel.ends, 0)], -1)
    runs = torch.cat([window, spans], 2)
    lo, hi = runs[..., 0], runs[..., 1]
    lo = torch.where(hi >= lo, lo, torch.full_like(lo, 1 << 62))  # empty runs sort last
    lo, order = lo.sort(dim=-1)
    hi = hi.gather(-1, order)
    covered = torch.nn.functional.pad(torch.cummax(hi, dim=-1).values[..., :-1], (1, 0), value=-1)
    return (hi - torch.maximum(lo, covered + 1) + 1).clamp_min(0).sum(-1)


def attend_union_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            sel: Selection, sw_start: torch.Tensor, scale: float) -> torch.Tensor:
    """Union span attention as one masked SDPA over contiguous keys k/v [Hkv, N, D] at positions 0..N-1.
    The span mask comes from a difference array (+1 at each span's start, -1 after its end, running sum > 0),
    so overlapping spans count once. q [Hq, M, D]; returns [Hq, M, D] in the accumulation dtype."""
    hq, m, _ = q.shape
    n = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    key = torch.arange(n, device=q.device)
    pos = positions.to(torch.int64)
    used = sel.valid & (sel.starts <= sel.ends)
    window = ((key[None, :] >= sw_start[:, None]) & (key[None, :] <= pos[:, None]))[None]  # [1, M, N]
    if bool(used.any()):
        mask = covered_by_runs(torch.where(used, sel.starts, n), torch.where(used, sel.ends + 1, n), n) | window
    else:  # no span (short contexts): the windows alone; None when they cover every key (a decode token)
        mask = None if bool(window.all()) else window.expand(hq, -1, -1)
    # The query heads of a KV head become rows of one [group * M] query block, so K/V are not repeated per head.
    hkv = k.shape[0]
    rows = (hq // hkv) * m
    qf = q.to(acc).reshape(hkv, rows, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, k.to(acc), v.to(acc), attn_mask=None if mask is None else mask.reshape(hkv, rows, n), scale=scale)
    return out.reshape(hq, m, -1)


def attend_blocks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  positions: torch.Tensor, sel: Selection, sw_start: torch.Tensor, combine: str, scale: float
                  ) -> torch.Tensor:
    """Span attention of a few queries (decode) over the paged cache, reading each KV head's key blocks once:
    the blocks that its query heads' windows, sinks and selected spans touch (a window is one run of blocks,
    shared by the group). One bmm scores the group's queries against them, then each query head keeps its own
    ranges: a range of key positions is one run of the gathered keys, which are in position order.
    q [Hq, M, D] at positions [M]; returns [Hq, M, D] in the accumulation dtype."""
    hq, m, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = positions.to(torch.int64)
    nb = int(pos.max()) // bs + 1  # blocks holding visible keys
    spans = bool(sel.valid.any())
    if spans:
        # Every key range [lo, hi] of every (query head, query): its window, then its spans (hi < lo: empty).
        lo = torch.cat([sw_start.expand(hq, m)[..., None], sel.starts], -1)  # [Hq, M, 1 + K]
        hi = torch.cat([pos.expand(hq, m)[..., None], torch.where(sel.valid, sel.ends, -1)], -1)
        order = _touched_blocks(lo.view(hkv, -1), hi.view(hkv, -1), bs, nb)
    else:  # windows only (no stripe yet, or none selected; both combines): one run of blocks for every head
        order = torch.arange(int(sw_start.min()) // bs, nb, device=q.device).expand(hkv, -1)
    key_pos = (order[..., None] * bs + torch.arange(bs, device=q.device)).view(hkv, -1)  # [Hkv, L], ascending
    # (block, head) slabs of the cache seen as [blocks * Hkv, bs, D] (a view also of vLLM's strided K and V):
    # index_select copies each slab at once
    rows = (block_table[order % nb].long() * hkv + torch.arange(hkv, device=q.device)[:, None]).view(-1)
    keys = k_cache.flatten(0, 1).index_select(0, rows).view(hkv, -1, d).to(acc)  # [Hkv, L, D]
    values = v_cache.flatten(0, 1).index_select(0, rows).view(hkv, -1, d).to(acc)
    n = keys.shape[1]
    scores = torch.bmm(q.to(acc).reshape(hkv, -1, d), keys.transpose(1, 2)).view(hq, m, n) * scale
    if not spans:
        window = (key_pos[0] >= sw_start[:, None]) & (key_pos[0] <= pos[:, None])  # [M, L]
        return _masked_attention(scores, window[None], values, hkv)[0]
    run_lo = torch.searchsorted(key_pos, lo.view(hkv, -1)).view(hq, m, -1)  # [Hq, M, 1 + K], runs [lo, hi)
    run_hi = torch.searchsorted(key_pos, hi.view(hkv, -1), right=True).view(hq, m, -1)
    if combine == "union":  # the union of the runs, each key once: a difference array over the gathered keys
        nonempty = run_hi > run_lo
        mask = covered_by_runs(torch.where(nonempty, run_lo, n), torch.where(nonempty, run_hi, n), n)
        return _masked_attention(scores, mask, values, hkv)[0]
    idx = torch.arange(n, device=q.device)
    in_run = (idx >= run_lo[..., None]) & (idx < run_hi[..., None])  # [Hq, M, 1 + K, L]
    return _gate_combine(scores, in_run[:, :, 0], in_run[:, :, 1:], sel, values, hkv)


def covered_by_runs(first: torch.Tensor, after: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] bool: the indices in [0, n) inside some run [first, after) of runs [..., R] (the caller gives an
    empty run first = after = n). A difference array (+1 at each run's first index, -1 after its last, running
    sum > 0), so overlapping runs count once."""
    ones = torch.ones_like(first, dtype=torch.int32)
    marks = torch.zeros(*first.shape[:-1], n + 1, dtype=torch.int32, device=first.device)
    marks.scatter_add_(-1, first, ones).scatter_add_(-1, after, -ones)
    return marks.cumsum(-1)[..., :n] > 0


def _touched_blocks(lo: torch.Tensor, hi: torch.Tensor, bs: int, nb: int) -> torch.Tensor:
    """[Hkv, width]: the blocks (of nb) that KV head h's key ranges [lo, hi] ([Hkv, R], hi < lo: empty) touch,
    in position order. A head that needs fewer than the neediest is padded with blocks numbered from nb on
    (their positions lie past every query, so no range covers them; the cache row read is block % nb)."""
    hkv = lo.shape[0]
    used = hi >= lo
    needed = covered_by_runs(torch.where(used, lo // bs, nb), torch.where(used, hi // bs + 1, nb), nb)
    width = int(needed.sum(1).max())
    if width == nb:  # a head needs every block: each head reads them all (its ranges mask the rest)
        return torch.arange(nb, device=lo.device).expand(hkv, nb)
    return (torch.arange(nb, device=lo.device) + torch.where(needed, 0, nb)).sort(1).values[:, :width]


def paged_span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         positions: torch.Tensor, params: SpanParams, *,
                         bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                         q_search: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """One sequence of the paged cache: q [Hq, M, D] at positions [M] -> [Hq, M, D] (q's dtype).

    Reads only anchors (or the per-block bounds [Hkv, nb, D] for summary search) and the attended keys,
    never the whole context: the engine's CPU path at long contexts."""
    spans = paged_span_select(q if q_search is None else q_search, k_cache, block_table, positions, params,
                              bounds=bounds)
    return paged_span_attend(q, k_cache, v_cache, block_table, positions, spans, params.combine, scale)


def span_attention_single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          params: SpanParams, *, q_search: torch.Tensor | None = None,
                          bounds: tuple[torch.Tensor, torch.Tensor] | None = None, block_size: int = 64,
                          scale: float | None = None) -> torch.Tensor:
    """One sequence: q [Hq, M, D] at positions [M], keys/values [Hkv, N, D]. Returns [Hq, M, D] (q dtype).

    bounds: per-block (kmin, kmax) [Hkv, ceil(N / block_size), D] for summary search (computed from k if
    None). Queries are tiled so the [Hq, tile, K, N] masks stay bounded."""
    hq, m, d = q.shape
    n = k.shape[1]
    if m == 0:
        return q.new_empty(hq, 0, d)
    scale = d ** -0.5 if scale is None else scale
    qs = q if q_search is None else q_search
    if params.search == "summary" and bounds is None:
        bounds = summary_tables(k, params, block_size)
    out = torch.empty(hq, m, d, dtype=q.dtype, device=q.device)
    t_max = int(positions.max()) + 1
    stripes = max(num_valid_stripes(t_max, params), 1)
    per_query = hq * max(n * (params.num_spans + 2), stripes * (d + 8))
    tile = max(1, _MAX_TILE_ELEMENTS // max(1, per_query))
    for s in range(0, m, tile):
        e = min(m, s + tile)
        sel, sw_start = select_spans(qs[:, s:e], k, positions[s:e], params, bounds=bounds, block_size=block_size)
        out[:, s:e] = attend(q[:, s:e], k, v, positions[s:e], sel, sw_start, params.combine, scale).to(q.dtype)
    return out


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, params: SpanParams,
                   *, q_search: torch.Tensor | None = None, block_size: int = 64) -> torch.Tensor:
    """Batched contiguous form: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], positions [Lq] -> [B, Hq, Lq, D]."""
    outs = []
    for b in range(q.shape[0]):
        qs = None if q_search is None else q_search[b]
        outs.append(span_attention_single(q[b], k[b], v[b], positions, params, q_search=qs, block_size=block_size))
    return torch.stack(outs)


def uncovered_keys(position: int, params: SpanParams) -> list[tuple[int, int]]:
    """The earlier keys of the query at `position` that lie neither in the window nor in ANY candidate
    span, as inclusive (first, last) runs. Structural non-exclusion asks for an empty list."""
    stripes = num_valid_stripes(position + 1, params)
    sw_start = max(0, position - params.window + 1) if stripes else 0  # no stripe: plain causal attention
    runs: list[tuple[int, int]] = []
    if stripes:
        geom = span_geometry(torch.tensor([position]), params, stripes)
        runs = sorted(zip(geom.starts[0].tolist(), geom.ends[0].tolist()))
    runs.append((sw_start, position))
    gaps = []
    covered_to = -1  # every key <= covered_to is covered
    for first, last in sorted(runs):
        if first > covered_to + 1:
            gaps.append((covered_to + 1, first - 1))
        covered_to = max(covered_to, last)
    if covered_to < position:
        gaps.append((covered_to + 1, position))
    return gaps
