"""Superlinear span attention (arXiv 2601.18401): the functional entry point and the paged backend.

`span_attention` works on contiguous tensors (tests, comparisons with other implementations);
`SuperlinearBackend` is the engine's backend over the paged KV cache (decode and chunked prefill).
The method, its formulas and its modes are described in docs/superlinear.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .base import AttentionMetadata, BackendError, BackendSetup, LayerCache, StepState
from .dense import DenseBackend, check_impl, resolve_impl
from .prefill import attend_by_prefill_mode, check_prefill
from .plan import AttentionPlan, LayerPlan
from .params import check_impl_name, with_defaults
from .reference import dense as dense_ref
from .reference import superlinear as ref
from .reference.block_summaries import summarize_full_blocks, update_block_summaries
from .reference.superlinear import SpanParams

# The engine's defaults for ordinary checkpoints (no trained search projection): summary search scored by the
# blocks' mean keys (the Quest bound misses needles on real weights, docs/superlinear.md), spans centred on their
# best blocks (a span chosen at its stripe's anchor may hold that block only at its edge), union merges spans,
# sinks and window exactly.
BACKEND_DEFAULTS = {"search": "summary", "combine": "union", "score": "mean", "sink_tokens": 16, "span_align": "block"}
PREFILL_DEFAULT = "dense"  # how prompt chunks attend: "sparse" or "dense" (kernels/prefill.py)


def make_params(values: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> SpanParams:
    """SpanParams from a (JSON) dict; unknown names and bad values raise BackendError."""
    known = {f.name: f.default for f in fields(SpanParams)}
    return SpanParams(**with_defaults("superlinear", values, {**known, **(defaults or {})}))


def backend_params(values: dict[str, Any] | None) -> SpanParams:
    """The engine backend's SpanParams: BACKEND_DEFAULTS under the given values, except the defaults that follow
    other choices: no sinks with the gate (they join the union only), anchor placement with anchor search
    (it scores no blocks)."""
    values = dict(values or {})
    defaults = dict(BACKEND_DEFAULTS)
    if values.get("combine", defaults["combine"]) != "union":
        defaults["sink_tokens"] = 0
    if values.get("search", defaults["search"]) != "summary":
        defaults["span_align"] = "anchor"
    return make_params(values, defaults)


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
                   q_search: torch.Tensor | None = None, sw_index: int = 63, num_spans: int = 3,
                   backward_factor: float = 2.0, forward_factor: float = 1.0, search_power: float = 0.5,
                   span_power: float = 0.5, combine: str = "gate", search: str = "anchor", score: str = "bound",
                   sink_tokens: int = 0, span_align: str = "anchor", impl: str = "auto", block_size: int = 64
                   ) -> torch.Tensor:
    """Superlinear span attention on contiguous tensors.

    q [B, Hq, Lq, D] (RoPE applied), k/v [B, Hkv, Lk, D] at key positions 0..Lk-1, positions [Lq] the
    absolute positions of the queries (< Lk; each query sees keys <= its position). q_search (same shape
    as q) is the search query of a checkpoint with a trained search projection; it defaults to q.
    block_size is the key block of the summary search's tables. Returns [B, Hq, Lq, D] in q's dtype.
    """
    params = SpanParams(sw_index=sw_index, num_spans=num_spans, backward_factor=backward_factor,
                        forward_factor=forward_factor, search_power=search_power, span_power=span_power,
                        combine=combine, search=search, score=score, sink_tokens=sink_tokens, span_align=span_align)
    _check_contiguous_inputs(q, k, v, positions, q_search, block_size)
    if resolve_impl(impl, q.device) == "triton":
        from .triton import superlinear as tri  # lazily: CPU-only installs never import triton

        return tri.span_attention_contiguous(q, k, v, positions, params, q_search=q_search, block_size=block_size)
    return ref.span_attention(q, k, v, positions, params, q_search=q_search, block_size=block_size)


def _check_contiguous_inputs(q, k, v, positions, q_search, block_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("span_attention: q, k, v must be 4-D ([B, H, L, D])")
    if k.shape != v.shape:
        raise ValueError(f"span_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"span_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"span_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if positions.dim() != 1 or positions.shape[0] != q.shape[2]:
        raise ValueError(f"span_attention: positions must be [Lq] = [{q.shape[2]}], got {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= k.shape[2]):
        raise ValueError(f"span_attention: positions must lie in [0, Lk) = [0, {k.shape[2]})")
    if q_search is not None and q_search.shape != q.shape:
        raise ValueError(f"span_attention: q_search {tuple(q_search.shape)} must have q's shape {tuple(q.shape)}")
    if block_size < 1:
        raise ValueError("span_attention: block_size must be >= 1")


# ------------------------------------------------------------------------------------ paged backend

def update_block_bounds(cache: LayerCache, meta: AttentionMetadata, params: SpanParams) -> None:
    """Refresh the summary tables (kmin/kmax, or kmean) of the blocks this step wrote (after the cache
    write), PyTorch version (kernels/reference/block_summaries.py, shared with HyLRA)."""
    update_block_summaries(cache.k, {n: cache.aux[n] for n in ref.summary_table_names(params)}, meta.slot_mapping)


def gather_block_bounds(cache: LayerCache, block_table: torch.Tensor, context_len: int, params: SpanParams
                        ) -> tuple[torch.Tensor, ...]:
    """One sequence's summary tables, each [Hkv, nb, D]: (kmin, kmax) or (kmean,)."""
    nb = (context_len + cache.block_size - 1) // cache.block_size
    ids = block_table[:nb].long()
    return tuple(cache.aux[n].index_select(0, ids).transpose(0, 1) for n in ref.summary_table_names(params))


class SuperlinearBackend:
    """Span search + span attention over the paged cache. plan.params: the keyword arguments of
    span_attention (sw_index, num_spans, backward_factor, forward_factor, search_power, span_power,
    combine, search) plus prefill ("sparse" or "dense", kernels/prefill.py) and impl; defaults as
    span_attention except search="summary", combine="union".

    Per layer the plan says: full = dense; compute = search spans and attend (the selection is left in
    state.selections[layer]); reuse = attend to the spans and windows layer `source` selected in this forward
    pass (no search, no bound update)."""

    name = "superlinear"

    def __init__(self, plan: Any = None, impl: str = "auto"):
        raw = dict(getattr(plan, "params", None) or {})
        impl = raw.pop("impl", impl)
        self.impl = check_impl_name("superlinear", impl)
        self.prefill = check_prefill("superlinear", raw.pop("prefill", PREFILL_DEFAULT))
        self.params = backend_params(raw)
        self.plan = plan if isinstance(plan, AttentionPlan) else None  # None: every layer computes
        if self.plan is not None:
            self.plan.validate()
        self._dense = DenseBackend(impl)

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {name: ((num_kv_heads, head_dim), None) for name in ref.summary_table_names(self.params)}

    def prepare_synthetic(self, layer_idx: int, cache: LayerCache, num_blocks: int) -> None:
        """Rebuild the summary tables of blocks [0, num_blocks) written directly into the cache, all full (benches)."""
        summarize_full_blocks(cache.k, {n: cache.aux[n] for n in ref.summary_table_names(self.params)}, num_blocks)

    def check(self, setup: BackendSetup) -> None:
        check_impl("superlinear", self.impl, setup.device)
        self._check_block_size(setup.block_size)

    def _check_block_size(self, block_size: int) -> None:
        if self.params.search == "summary" and self.params.window + 1 < block_size:
            # Otherwise the block holding a span's last key could hold keys after the query.
            raise BackendError(f"superlinear: summary search needs a window of at least block_size - 1 = "
                               f"{block_size - 1} keys (sw_index {self.params.sw_index} gives {self.params.window})")

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        """compute: search spans, attend, and leave the selection in state.selections[layer_idx];
        reuse: attend to the spans (and windows) layer `source` selected in this forward pass, no search."""
        layer = self.plan.layers[layer_idx] if self.plan is not None else LayerPlan("compute")
        if layer.mode == "full":
            return self._dense.forward(layer_idx, q, k, v, cache, meta, state)
        self._check_block_size(cache.block_size)
        triton = resolve_impl(self.impl, q.device) == "triton"
        if triton:
            from .triton import dense as dense_kern
            from .triton import superlinear as tri
        else:
            dense_kern = dense_ref
        dense_kern.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        if layer.mode == "compute" and self.params.search == "summary":
            if triton:
                tri.update_block_summaries(cache.k, {n: cache.aux[n] for n in ref.summary_table_names(self.params)},
                                           meta.slot_mapping)
            else:
                update_block_bounds(cache, meta, self.params)

        def sparse(qs: torch.Tensor, m: AttentionMetadata) -> torch.Tensor:
            if layer.mode == "reuse":
                selection = state.selections.get(layer.source)
                if not isinstance(selection, SpanSelection) or selection.num_tokens != qs.shape[0] \
                        or selection.num_heads != qs.shape[1] or (selection.paged is not None) != triton:
                    raise BackendError(f"superlinear: layer {layer_idx} reuses layer {layer.source}'s spans, but "
                                       "that layer selected none for this step")
            else:
                selection = self.select(qs, cache, m)
                state.selections[layer_idx] = selection
            return self.attend(qs, cache, m, selection)

        return attend_by_prefill_mode(self.prefill, q, meta, sparse,
                                      lambda qs, m: dense_kern.paged_attention(qs, cache.k, cache.v, m))

    def select(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> "SpanSelection":
        """The span search of every step token over the paged cache (already written, bounds updated)."""
        if resolve_impl(self.impl, q.device) == "triton":
            from .triton import superlinear as tri

            return SpanSelection(q.shape[0], q.shape[1], paged=tri.select_spans(q, cache, meta, self.params))
        per_seq = []
        for i in range(meta.num_seqs):
            sl = meta.query_slice(i)
            ctx = meta.context_lens_cpu[i]
            table = meta.block_tables[i]
            # no bounds where no query has a stripe to score (short contexts): the search is skipped there
            searched = self.params.search == "summary" and ref.num_valid_stripes(ctx, self.params) > 0
            bounds = gather_block_bounds(cache, table, ctx, self.params) if searched else None
            per_seq.append(ref.paged_span_select(q[sl].transpose(0, 1), cache.k, table, meta.positions[sl],
                                                 self.params, bounds=bounds))
        return SpanSelection(q.shape[0], q.shape[1], per_seq=per_seq)

    def attend(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, selection: "SpanSelection"
               ) -> torch.Tensor:
        """Span attention of every step token over a selection's spans and windows. [T, Hq, D]."""
        if selection.paged is not None:
            from .triton import superlinear as tri

            return tri.paged_attend(q, cache, meta, selection.paged)
        out = torch.empty_like(q)
        for i, spans in enumerate(selection.per_seq):
            sl = meta.query_slice(i)
            if sl.stop > sl.start:
                out[sl] = ref.paged_span_attend(q[sl].transpose(0, 1), cache.k, cache.v, meta.block_tables[i],
                                                meta.positions[sl], spans, self.params.combine).transpose(0, 1)
        return out

    def free_sequence(self, seq_id: int) -> None:
        pass  # no per-sequence state: everything lives in the cache and its aux tables


@dataclass
class SpanSelection:
    """What a superlinear COMPUTE layer leaves in StepState.selections for its REUSE layers: the selected
    spans and windows of every step token and query head. The reference path keeps one ref.PagedSpans per
    sequence of the step, the Triton path the kernels' PagedSelection ([T, Hq, K, 2] key ranges)."""

    num_tokens: int
    num_heads: int
    per_seq: list[ref.PagedSpans] | None = None
    paged: Any = None  # kernels.triton.superlinear.PagedSelection


def paged_reference(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, params: SpanParams) -> torch.Tensor:
    """Span attention of every step token over its sequence's paged cache (already written), PyTorch:
    reads only the anchors or block bounds and the attended keys (kernels/reference/superlinear.py)."""
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        sl = meta.query_slice(i)
        if sl.stop == sl.start:
            continue
        ctx = meta.context_lens_cpu[i]
        table = meta.block_tables[i]
        bounds = gather_block_bounds(cache, table, ctx, params) if params.search == "summary" else None
        o = ref.paged_span_attention(q[sl].transpose(0, 1), cache.k, cache.v, table, meta.positions[sl], params,
                                     bounds=bounds)
        out[sl] = o.transpose(0, 1)
    return out
