"""Routing attention (Routing Transformer, arXiv 2003.05997), training-free over the paged cache.

Each sequence's post-RoPE keys are clustered per layer and KV head by spherical k-means (per segment of
`segment_tokens` keys, online EMA assignment for the open segment); each query tile scores the clusters by
their mean key against the GQA group's summed queries and attends exactly to the best clusters' members up to
a token budget, plus sink tokens and a local window (the current prefill chunk is attended causally).
Semantics: kernels/reference/routing.py. Method notes and measurements: docs/routing.md.

Per layer the plan says: full = dense; compute = cluster, route and attend (the selection is left in
state.selections[layer]); reuse = attend to the positions layer `source` routed to in this forward pass.

Parameters (plan.params):
  segment_tokens        1024   keys per k-means segment (a sequence attends densely until its first one completes)
  tokens_per_cluster    16     segment_tokens // tokens_per_cluster clusters per segment ...
  clusters_per_segment  None   ... unless this is given
  kmeans_iters          4      Lloyd iterations when a segment completes
  decay                 0.999  EMA decay of the live centroids (open segment), in [0, 1]
  budget_tokens         2048   routed keys per query tile (sinks and window come on top) ...
  budget_frac           None   ... or this fraction of the keys the tile sees, when given (0 < f <= 1)
  sink_tokens           16     first keys always attended (< segment_tokens)
  window                1024   recent keys always attended, counting the query itself (>= 1)
  prefill_tile          64     query tokens per routing tile in prefill
  prefill               "dense"   prompt chunks attend densely ("dense") or sparsely ("sparse"); kernels/prefill.py

State: one ClusterTable per (sequence, compute layer) in host memory of this object, on the cache's device;
freed by free_sequence. Tables are rebuilt from the cache when a sequence arrives with keys already written
(prefix-cache hit, recompute after preemption). aux_specs is empty: the tables are per sequence, not per block,
so the engine's KV budget does not count them (about 8 bytes per token and KV head per layer, plus cluster
means: docs/routing.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionMetadata, BackendError, BackendSetup, LayerCache, StepState
from .dense import DenseBackend, check_impl, resolve_impl
from .plan import AttentionPlan
from .params import check_impl_name, int_param, number_param, with_defaults
from .prefill import attend_by_prefill_mode, check_prefill
from .reference import dense as ref_dense
from .reference import routing as ref

DEFAULT_PARAMS: dict[str, Any] = {
    "segment_tokens": 1024,
    "tokens_per_cluster": 16,
    "clusters_per_segment": None,
    "kmeans_iters": 4,
    "decay": 0.999,
    "budget_tokens": 2048,
    "budget_frac": None,
    "sink_tokens": 16,
    "window": 1024,
    "prefill_tile": 64,
    "prefill": "dense",
}


def validate_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and clusters_per_segment resolved; a BackendError naming the first bad parameter."""
    out = with_defaults("routing", params, DEFAULT_PARAMS)
    seg = int_param("routing", out, "segment_tokens", 1)
    tpc = int_param("routing", out, "tokens_per_cluster", 1)
    if out["clusters_per_segment"] is None:
        out["clusters_per_segment"] = max(1, seg // tpc)
    clusters = int_param("routing", out, "clusters_per_segment", 1)
    if clusters > seg:
        raise BackendError(f"routing: clusters_per_segment ({clusters}) exceeds segment_tokens ({seg})")
    int_param("routing", out, "kmeans_iters", 0)
    out["decay"] = number_param("routing", out, "decay", 0.0, 1.0)
    int_param("routing", out, "budget_tokens", 0)
    if out["budget_frac"] is not None:
        out["budget_frac"] = number_param("routing", out, "budget_frac", 0.0, 1.0, open_low=True)
    sink = int_param("routing", out, "sink_tokens", 0)
    if sink >= seg:
        raise BackendError(f"routing: sink_tokens ({sink}) must be below segment_tokens ({seg})")
    int_param("routing", out, "window", 1)
    int_param("routing", out, "prefill_tile", 1)
    check_prefill("routing", out["prefill"])
    return out


class RoutingBackend:
    name = "routing"

    def __init__(self, plan: AttentionPlan, impl: str = "auto"):
        check_impl_name("routing", impl)
        plan.validate()
        self.plan = plan
        self.impl = impl
        self.params = validate_params(plan.params)
        self._dense = DenseBackend(impl)
        self._tables: dict[int, dict[int, ref.ClusterTable]] = {}  # seq id -> layer -> table

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {}

    def check(self, setup: BackendSetup) -> None:
        check_impl("routing", self.impl, setup.device)

    # -- per-sequence state ---------------------------------------------------------------------------------
    def free_sequence(self, seq_id: int) -> None:
        self._tables.pop(seq_id, None)

    def tracked_sequences(self) -> list[int]:
        return sorted(self._tables)

    def state_bytes(self) -> int:
        """Device bytes held by every cluster table."""
        return sum(t.nbytes() for layers in self._tables.values() for t in layers.values())

    def table(self, seq_id: int, layer_idx: int) -> ref.ClusterTable | None:
        return self._tables.get(seq_id, {}).get(layer_idx)

    def _table_for(self, seq_id: int, layer_idx: int, cache: LayerCache, keys_before: int) -> ref.ClusterTable:
        layers = self._tables.setdefault(seq_id, {})
        table = layers.get(layer_idx)
        if table is None or table.num_seen > keys_before:
            # New sequence, or one whose earlier keys were rewritten (recomputed without free_sequence).
            p = self.params
            table = ref.ClusterTable(cache.num_kv_heads, cache.head_dim, p["segment_tokens"],
                                     p["clusters_per_segment"], p["sink_tokens"], cache.k.device)
            layers[layer_idx] = table
        return table

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        if not 0 <= layer_idx < len(self.plan.layers):
            raise BackendError(f"routing: layer {layer_idx} is outside the plan's {len(self.plan.layers)} layers")
        if q.shape[1] % k.shape[1] != 0:
            raise BackendError(f"routing: {q.shape[1]} query heads do not split into {k.shape[1]} KV groups")
        layer = self.plan.layers[layer_idx]
        if layer.mode == "full":
            return self._dense.forward(layer_idx, q, k, v, cache, meta, state)
        if resolve_impl(self.impl, q.device) == "triton":
            from .triton import dense as dense_kern  # lazily: CPU-only installs never import triton
            from .triton import routing as kern
        else:
            kern, dense_kern = None, ref_dense
        dense_kern.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)

        def sparse(qs: torch.Tensor, m: AttentionMetadata) -> torch.Tensor:
            if layer.mode == "compute":
                selection = self.select(layer_idx, qs, cache, m, ops=kern or ref.REFERENCE_OPS)
                state.selections[layer_idx] = selection
            else:
                selection = state.selections.get(layer.source)
                if not isinstance(selection, ref.RoutingSelection) or \
                        sum(t.q_len for t in selection.tiles) != qs.shape[0]:
                    raise BackendError(f"routing: layer {layer_idx} reuses layer {layer.source}'s selection, but "
                                       "that layer routed none for this step")
            return (kern or ref).attend(qs, cache.k, cache.v, m.block_tables, selection)

        return attend_by_prefill_mode(self.params["prefill"], q, meta, sparse,
                                      lambda qs, m: dense_kern.paged_attention(qs, cache.k, cache.v, m))

    def select(self, layer_idx: int, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
               ops=ref.REFERENCE_OPS) -> ref.RoutingSelection:
        """Update the step's sequences' cluster tables from the (already written) cache and route every tile."""
        p = self.params
        if len(meta.seq_ids) != meta.num_seqs:
            raise BackendError("routing: the attention metadata lacks seq_ids (one per sequence)")
        tiles = ref.make_tiles(meta, p["prefill_tile"], p["window"], p["sink_tokens"], p["budget_tokens"],
                               p["budget_frac"])
        qsum = ref.group_query_sums(q, cache.num_kv_heads)
        on_host = q.device.type == "cpu"
        all_tiles, routed, counts = [], [], []
        first = 0
        for i in range(meta.num_seqs):
            seq_tiles = [t for t in tiles if t.seq == i]
            ctx, qlen = meta.context_lens_cpu[i], meta.query_lens_cpu[i]
            if not seq_tiles:
                continue
            table = self._table_for(meta.seq_ids[i], layer_idx, cache, ctx - qlen)
            table.catch_up(cache.k, meta.block_tables[i], ctx, min(t.local_lo for t in seq_tiles),
                           p["kmeans_iters"], p["decay"], ops)
            if not table.has_codebook:
                seq_tiles = [ref.dense_tile(t) for t in seq_tiles]
            capacity = None if on_host else min(max(max(t.local_lo - p["sink_tokens"], 0) for t in seq_tiles),
                                                max(t.budget for t in seq_tiles) + p["segment_tokens"])
            r, c = ref.route_sequence(table, qsum[first:first + qlen], seq_tiles, first, capacity)
            all_tiles += seq_tiles
            routed.append(r)
            counts.append(c)
            first += qlen
        width = max((r.shape[2] for r in routed), default=0)
        routed = [torch.nn.functional.pad(r, (0, width - r.shape[2]), value=-1) for r in routed]
        h = cache.num_kv_heads
        return ref.RoutingSelection(
            all_tiles,
            torch.cat(routed) if routed else torch.zeros(0, h, 0, dtype=torch.int32, device=q.device),
            torch.cat(counts) if counts else torch.zeros(0, h, dtype=torch.int32, device=q.device),
            ref.tile_info_tensor(all_tiles, q.device))
