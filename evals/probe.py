"""What each attention layer actually attended to, read from the selections the backends leave in StepState.

`SelectionProbe` wraps the engine's backend (a PlannedBackend): every layer runs exactly as it would in the
server; afterwards the probe reads the layer's selection (state.selections[layer], or its source's for a
reuse layer) and counts, per sequence:
  attended share  keys attended / keys visible, summed over layers, heads and query tokens (causal: a query at
                  position p sees p + 1 keys; full layers and dense-prefilled prompt chunks attend to all)
  needle recall   (when the sequence was registered with `watch`) for every query at or after the question's
                  first token, per layer and query head: the share of the evidence tokens (the needle) inside the
                  selection; beside it the exact (dense) softmax mass those queries put on the evidence and the
                  best rank of an evidence token among all keys by exact score, so a miss can be told apart:
                  within the budget (the method's search ranked the needle too low) or beyond it (even exact
                  top-k attention at this budget would drop it).

Selections are read through `selected_keys`, one adapter per selection type (HyLRA blocks per query tile,
routing positions per tile, superlinear spans and windows per token and query head, from the reference or the
Triton path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..kernels.base import AttentionMetadata, LayerCache, StepState


@dataclass
class KeyRows:
    """Queries of sequence `seq` (index in the selection's own metadata) at positions first_pos..last_pos,
    their rows [q_start, q_end) in the selection's query tensor, sharing one key set per selection head:
    keys[h] (positions, may exceed a query's position: causality clips them). A selection head is a KV head,
    or a query head for per-query-head selections."""

    seq: int
    q_start: int
    q_end: int
    first_pos: int
    last_pos: int
    keys: list[torch.Tensor]

    def attended(self) -> float:
        """Keys attended, summed over the queries, averaged over the selection heads."""
        return sum(attended_sum(k, self.first_pos, self.last_pos) for k in self.keys) / len(self.keys)

    def key_sets(self, pos: int) -> list[torch.Tensor]:
        return self.keys


@dataclass
class IntervalRows:
    """Queries of sequence `seq` each with its own key intervals per selection head: intervals [H, M, J, 2]
    (inclusive [lo, hi], lo > hi = empty, possibly overlapping) for the queries at `positions` [M], rows
    q_start.. in the selection's query tensor."""

    seq: int
    q_start: int
    positions: torch.Tensor
    intervals: torch.Tensor

    @property
    def q_end(self) -> int:
        return self.q_start + len(self.positions)

    @property
    def first_pos(self) -> int:
        return int(self.positions[0])

    @property
    def last_pos(self) -> int:
        return int(self.positions[-1])

    def attended(self) -> float:
        """Size of each query's union of intervals (clipped to its position), summed over the queries,
        averaged over the heads."""
        lo, hi = self.intervals[..., 0], torch.minimum(self.intervals[..., 1], self.positions[None, :, None])
        lo = torch.where(hi >= lo, lo, torch.full_like(lo, 1 << 62))  # empty intervals sort last
        lo, order = lo.sort(dim=-1)
        hi = hi.gather(-1, order)
        prev_end = torch.cummax(hi, dim=-1).values
        prev_end = torch.nn.functional.pad(prev_end[..., :-1], (1, 0), value=-1)
        size = (hi - torch.maximum(lo, prev_end + 1) + 1).clamp_min(0)
        return float(size.sum()) / self.intervals.shape[0]

    def key_sets(self, pos: int) -> list[torch.Tensor]:
        m = int((self.positions == pos).nonzero()[0, 0])
        return [torch.unique(torch.cat([torch.arange(int(a), max(int(a), min(int(b), pos) + 1))
                                        for a, b in self.intervals[h, m]]))
                for h in range(self.intervals.shape[0])]


def _hylra_rows(sel) -> Iterator[KeyRows]:
    bs = sel.block_size
    offsets = torch.arange(bs, device=sel.blocks.device)
    for t, tile in enumerate(sel.tiles):
        keys = []
        for h in range(sel.blocks.shape[1]):
            blocks = sel.blocks[t, h]
            blocks = blocks[blocks >= 0].long()
            keys.append((blocks[:, None] * bs + offsets).reshape(-1).cpu())
        yield KeyRows(tile.seq, tile.q_start, tile.q_end, tile.first_pos, tile.last_pos, keys)


def _routing_rows(sel) -> Iterator[KeyRows]:
    for t, tile in enumerate(sel.tiles):
        keys = [sel.positions(t, h).cpu() for h in range(sel.routed.shape[1])]
        yield KeyRows(tile.seq, tile.q_start, tile.q_start + tile.q_len, tile.first_pos, tile.last_pos, keys)


def _span_rows(sel, meta: AttentionMetadata) -> Iterator[IntervalRows]:
    if sel.paged is not None:  # Triton: key ranges [T, Hq, J, 2] (end exclusive) beside each token's window
        for i in range(meta.num_seqs):
            sl = meta.query_slice(i)
            pos = meta.positions[sl].cpu()
            ranges = sel.paged.ranges[sl].long().cpu().transpose(0, 1)  # [Hq, M, J, 2]
            spans = torch.stack([ranges[..., 0], ranges[..., 1] - 1], -1)
            window = torch.stack([sel.paged.geometry.sw_start[sl].cpu(), pos], -1)
            window = window[None, :, None].expand(spans.shape[0], -1, -1, -1)
            yield IntervalRows(i, sl.start, pos, torch.cat([window, spans], 2))
        return
    for i, spans in enumerate(sel.per_seq):
        base = meta.query_slice(i).start
        positions = meta.positions[meta.query_slice(i)].cpu()
        for s, e, span_sel, sw_start in spans.tiles:
            pos = positions[s:e]
            hq = span_sel.starts.shape[0]
            window = torch.stack([sw_start.cpu(), pos], -1)[None, :, None].expand(hq, -1, -1, -1)
            lo = torch.where(span_sel.valid, span_sel.starts, torch.ones_like(span_sel.starts)).cpu()
            hi = torch.where(span_sel.valid, span_sel.ends, torch.zeros_like(span_sel.ends)).cpu()
            intervals = torch.cat([window, torch.stack([lo, hi], -1)], 2)  # [Hq, M, 1 + K, 2]
            yield IntervalRows(i, base + s, pos, intervals)


def selected_keys(selection: Any, meta: AttentionMetadata) -> Iterator[KeyRows | IntervalRows]:
    """The key sets of a selection (meta: the metadata the selection was made with). TypeError for a
    selection this module cannot read."""
    kind = type(selection).__name__
    if kind == "HyLRASelection":
        return _hylra_rows(selection)
    if kind == "RoutingSelection":
        return _routing_rows(selection)
    if kind == "SpanSelection":
        return _span_rows(selection, meta)
    raise TypeError(f"no key-set adapter for selection type {kind}")


def attended_sum(keys: torch.Tensor, first: int, last: int) -> int:
    """Sum over the queries at positions first..last of the keys in `keys` each one sees (key <= position)."""
    keys = keys[keys <= last]
    return int((last - torch.clamp(keys, min=first) + 1).sum())


def visible_sum(first: int, last: int) -> int:
    """Sum over positions first..last of (position + 1): the keys a causal query sees."""
    return (last * (last + 1) - (first - 1) * first) // 2 + (last - first + 1)


@dataclass
class Watch:
    """A sequence whose needle recall the probe measures."""

    evidence: torch.Tensor  # [E] prompt positions of the needle tokens
    question_start: int
    prompt_len: int
    # per layer: one record per (query, query head): (phase, head, recall, dense_mass, best_rank, selected)
    records: dict[int, list[tuple]] = field(default_factory=dict)


class SelectionProbe:
    """Runs the wrapped backend unchanged and measures what each layer attended (see the module doc)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.plan = inner.plan
        # seq id -> [attended, visible] in prompt chunks, then the same in decode steps (one token per sequence)
        self.counts: dict[int, list[int]] = {}
        self.watches: dict[int, Watch] = {}
        self.unmeasured: set[str] = set()  # selection kinds the probe could not read (reported)

    # -- the backend protocol -------------------------------------------------------------------------------
    def aux_specs(self, num_kv_heads, head_dim):
        return self.inner.aux_specs(num_kv_heads, head_dim)

    def check(self, setup) -> None:
        if hasattr(self.inner, "check"):
            self.inner.check(setup)

    def free_sequence(self, seq_id: int) -> None:
        self.inner.free_sequence(seq_id)

    def state_bytes(self) -> int:
        return self.inner.state_bytes() if hasattr(self.inner, "state_bytes") else 0

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        out = self.inner.forward(layer_idx, q, k, v, cache, meta, state)
        with torch.inference_mode():
            self._measure(layer_idx, q, cache, meta, state)
        return out

    def watch(self, seq_id: int, evidence_positions: list[int], question_start: int, prompt_len: int) -> None:
        self.watches[seq_id] = Watch(torch.tensor(evidence_positions, dtype=torch.long), question_start, prompt_len)

    # -- measuring ------------------------------------------------------------------------------------------
    def _layer_selection(self, layer_idx: int, state: StepState) -> Any:
        layer = self.plan.layers[layer_idx]
        if layer.mode == "full":
            return None
        return state.selections.get(layer_idx if layer.mode == "compute" else layer.source)

    def _sparse_view(self, layer_idx: int, meta: AttentionMetadata
                     ) -> tuple[list[int], AttentionMetadata, torch.Tensor | None]:
        """The step's sequences the layer's method attended sparsely (in the order its selection lists them),
        the metadata the selection was made with, and its token rows in the step (None: the same rows): all
        sequences, or with prefill "dense" only the decoding ones (kernels/prefill.py)."""
        backend = self.inner.layer_backend(layer_idx) if hasattr(self.inner, "layer_backend") else self.inner
        params = getattr(backend, "params", None)  # hylra, routing: a dict; superlinear: a .prefill attribute
        mode = params.get("prefill") if isinstance(params, dict) else getattr(backend, "prefill", None)
        if mode == "dense" and meta.max_query_len > 1:
            from ..kernels.prefill import sequence_subset

            seqs = [i for i, n in enumerate(meta.query_lens_cpu) if n <= 1]
            if not seqs:
                return [], meta, None
            sub, tokens = sequence_subset(meta, seqs)
            return seqs, sub, tokens.cpu()
        return list(range(meta.num_seqs)), meta, None

    def _measure(self, layer_idx: int, q, cache: LayerCache, meta: AttentionMetadata, state: StepState) -> None:
        hkv = cache.num_kv_heads
        selection = self._layer_selection(layer_idx, state)
        sparse, rows, tokens = [], [], None
        if selection is not None:
            sparse, sel_meta, tokens = self._sparse_view(layer_idx, meta)
            try:
                rows = list(selected_keys(selection, sel_meta)) if sparse else []
            except TypeError:
                self.unmeasured.add(type(selection).__name__)
                sparse, rows = [], []
        for i in range(meta.num_seqs):  # sequences attended densely: every visible key
            if i in sparse:
                continue
            ctx, qlen = meta.context_lens_cpu[i], meta.query_lens_cpu[i]
            first, last = ctx - qlen, ctx - 1
            v = visible_sum(first, last) * hkv
            self._count(meta, i, v, v)
            w = self.watches.get(meta.seq_ids[i])
            if w is not None and last >= w.question_start:
                lo = max(first, w.question_start)
                start = meta.query_slice(i).start + lo - first
                self._watch(layer_idx, w, i, list(range(lo, last + 1)), q[start:start + last - lo + 1], cache,
                            meta, None)
        for row in rows:
            i = sparse[row.seq]  # the selection's sequence index -> the step's
            self._count(meta, i, round(row.attended() * hkv), visible_sum(row.first_pos, row.last_pos) * hkv)
            w = self.watches.get(meta.seq_ids[i])
            if w is not None and row.last_pos >= w.question_start:
                lo = max(row.first_pos, w.question_start)
                q_rows = torch.arange(row.q_start + lo - row.first_pos, row.q_end)
                if tokens is not None:
                    q_rows = tokens[q_rows]
                self._watch(layer_idx, w, i, list(range(lo, row.last_pos + 1)), q[q_rows.to(q.device)], cache,
                            meta, row)

    def _count(self, meta: AttentionMetadata, i: int, attended: int, visible: int) -> None:
        c = self.counts.setdefault(meta.seq_ids[i], [0, 0, 0, 0])
        at = 0 if meta.query_lens_cpu[i] > 1 else 2
        c[at] += attended
        c[at + 1] += visible

    # -- needle recall --------------------------------------------------------------------------------------
    def _exact(self, q_rows: torch.Tensor, positions: list[int], cache: LayerCache, meta: AttentionMetadata,
               i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact softmax probabilities and scores of queries q_rows [M, Hq, D] at `positions` over sequence i's
        keys: ([M, Hq, n], same), n = the last position + 1 (keys after a query's position masked)."""
        from ..kernels.reference.dense import gather_kv

        n = max(positions) + 1
        keys = gather_kv(cache.k, meta.block_tables[i], n).float()  # [Hkv, n, D]
        hq, hkv, d = q_rows.shape[1], keys.shape[0], keys.shape[2]
        qf = q_rows.float().reshape(len(positions), hkv, hq // hkv, d)
        scores = torch.einsum("mhgd,hnd->mhgn", qf, keys).reshape(len(positions), hq, n) * d ** -0.5
        scores = scores.cpu()  # a handful of queries: the bookkeeping below is on the host
        pos = torch.tensor(positions)
        scores = scores.masked_fill(torch.arange(n)[None, None, :] > pos[:, None, None], float("-inf"))
        return torch.softmax(scores, dim=-1), scores

    def _watch(self, layer_idx: int, w: Watch, i: int, positions: list[int], q_rows: torch.Tensor,
               cache: LayerCache, meta: AttentionMetadata, row: KeyRows | IntervalRows | None) -> None:
        """Record, for each query at `positions` (rows q_rows [M, Hq, D]) and query head: the evidence recall
        of its selection (row None: everything is attended), the exact softmax mass on the evidence, the
        best exact rank of an evidence token and the number of keys selected."""
        probs, scores = self._exact(q_rows, positions, cache, meta, i)
        hq = probs.shape[1]
        rec = w.records.setdefault(layer_idx, [])
        ev = w.evidence
        for m, pos in enumerate(positions):
            phase = "decode" if pos >= w.prompt_len else "prompt"
            selected = row.key_sets(pos) if row is not None else None
            order = scores[m].argsort(dim=-1, descending=True)  # [Hq, n]
            rank_of = torch.empty_like(order)
            rank_of.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
            for h in range(hq):
                if selected is None:
                    recall, n_sel = 1.0, pos + 1
                else:
                    s = selected[h * len(selected) // hq]
                    s = s[s <= pos]
                    recall, n_sel = float(torch.isin(ev, s).float().mean()), int(s.numel())
                rec.append((phase, h, recall, float(probs[m, h, ev].sum()), int(rank_of[h, ev].min()), n_sel))

    # -- results --------------------------------------------------------------------------------------------
    def attended_share(self, seq_id: int, phase: str | None = None) -> float | None:
        """Keys attended / keys visible of a sequence: in all its steps, or phase "prompt" / "decode" only."""
        c = self.counts.get(seq_id)
        if not c:
            return None
        att, vis = {None: (c[0] + c[2], c[1] + c[3]), "prompt": (c[0], c[1]), "decode": (c[2], c[3])}[phase]
        return att / vis if vis else None
