"""HyLRA (arXiv 2602.00777): top-k block attention with cross-layer reuse of the selection.

Per layer the plan says:
  full     dense attention (normally routed to DenseBackend by kernels/registry.py; handled here too)
  compute  score the blocks from per-block key summaries (aux tables), keep sinks + recent blocks +
           the top-scoring blocks up to the token budget, attend to them; the selection is left in
           state.selections[layer] for later layers
  reuse    attend to exactly the blocks that layer `source` selected in this forward pass (no scoring)
Sparse in decode and in chunked prefill (one selection per query tile). Selection semantics: see
kernels/reference/hylra.py.

Parameters (plan.params):
  topk_tokens   2048   token budget per query tile, sinks and recent blocks included (rounded up to blocks)
  sink_blocks   1      first blocks always kept
  recent_blocks 4      most recent blocks always kept, counting the query's own block (>= 1)
  per_head      true   each query head selects for itself (false: one selection per GQA group)
  head_reduce   "max"  how a GQA group's per-head block scores combine: "max" or "sum"
  prefill_tile  64     query tokens per selection tile in prefill
  score         "mean" block score: "mean" = q . mean key (aux table kmean), "bound" = Quest upper bound
                       sum_d max(q_d kmin_d, q_d kmax_d) (aux tables kmin, kmax)
  prefill       "dense"  prompt chunks attend densely ("dense") or sparsely ("sparse"); kernels/prefill.py
Defaults "mean" and "max" measured best on the default model (docs/policies.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttentionMetadata, BackendError, BackendSetup, LayerCache, StepState
from .dense import DenseBackend, check_impl, resolve_impl
from .plan import AttentionPlan
from .params import bool_param, check_impl_name, choice_param, int_param, with_defaults
from .prefill import attend_by_prefill_mode, check_prefill
from .reference import dense as ref_dense
from .reference import hylra as ref
from .reference import block_summaries as ref_summaries

DEFAULT_PARAMS: dict[str, Any] = {
    "topk_tokens": 2048,
    "sink_blocks": 1,
    "recent_blocks": 4,
    "per_head": True,
    "head_reduce": "max",
    "prefill_tile": 64,
    "score": "mean",
    "prefill": "dense",
}

# Per-block key summaries each score needs (aux tables [num_blocks, Hkv, D] in the cache dtype).
SUMMARY_TABLES = {"mean": ("kmean",), "bound": ("kmin", "kmax")}


def validate_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in; a BackendError naming the first bad or unknown parameter."""
    out = with_defaults("hylra", params, DEFAULT_PARAMS)
    int_param("hylra", out, "topk_tokens", 1)
    int_param("hylra", out, "sink_blocks", 0)
    int_param("hylra", out, "recent_blocks", 1)
    int_param("hylra", out, "prefill_tile", 1)
    bool_param("hylra", out, "per_head")
    choice_param("hylra", out, "head_reduce", ("max", "sum"))
    choice_param("hylra", out, "score", SUMMARY_TABLES)
    check_prefill("hylra", out["prefill"])
    return out


class HyLRABackend:
    name = "hylra"

    def __init__(self, plan: AttentionPlan, impl: str = "auto"):
        check_impl_name("hylra", impl)
        plan.validate()
        self.plan = plan
        self.impl = impl
        self.params = validate_params(plan.params)
        self._dense = DenseBackend(impl)

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        # Per block and KV head: the mean key ("mean") or the elementwise min and max of the keys ("bound"),
        # in the cache dtype (min/max exact; the mean computed in float32, rounded once).
        return {name: ((num_kv_heads, head_dim), None) for name in SUMMARY_TABLES[self.params["score"]]}

    def check(self, setup: BackendSetup) -> None:
        if check_impl("hylra", self.impl, setup.device) == "triton":
            from .triton import hylra as kern

            try:
                kern.check_block_size(setup.block_size)
            except ValueError as e:
                raise BackendError(f"hylra: {e} (or use impl='torch')") from None

    def prepare_synthetic(self, layer_idx: int, cache: LayerCache, num_blocks: int) -> None:
        """Rebuild the summaries of blocks [0, num_blocks) written directly into the cache, all full (benches)."""
        ref_summaries.summarize_full_blocks(cache.k, cache.aux, num_blocks)

    def _selection_params(self) -> dict[str, Any]:
        p = self.params
        return {k: p[k] for k in ("topk_tokens", "sink_blocks", "recent_blocks", "per_head", "head_reduce",
                                  "prefill_tile", "score")}

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        if not 0 <= layer_idx < len(self.plan.layers):
            raise BackendError(f"hylra: layer {layer_idx} is outside the plan's {len(self.plan.layers)} layers")
        needed = SUMMARY_TABLES[self.params["score"]]
        if any(name not in cache.aux for name in needed):
            raise BackendError(f"hylra: the layer cache lacks the aux table(s) {', '.join(needed)} "
                               "(allocate them with aux_specs)")
        if q.shape[1] % k.shape[1] != 0:
            raise BackendError(f"hylra: {q.shape[1]} query heads do not split into {k.shape[1]} KV groups")
        layer = self.plan.layers[layer_idx]
        if layer.mode == "full":
            return self._dense.forward(layer_idx, q, k, v, cache, meta, state)
        if resolve_impl(self.impl, q.device) == "triton":
            from .triton import block_summaries as summaries
            from .triton import dense as dense_kern
            from .triton import hylra as kern  # lazily: CPU-only installs never import triton
            try:
                kern.check_block_size(meta.block_size)
            except ValueError as e:
                raise BackendError(f"hylra: {e} (or use impl='torch')") from None
        else:
            kern, dense_kern, summaries = ref, ref_dense, ref_summaries
        dense_kern.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        summaries.update_block_summaries(cache.k, cache.aux, meta.slot_mapping)

        def sparse(qs: torch.Tensor, m: AttentionMetadata) -> torch.Tensor:
            if layer.mode == "compute":
                selection = kern.select(qs, cache.aux, m, **self._selection_params())
                state.selections[layer_idx] = selection
            else:
                selection = state.selections.get(layer.source)
                if not isinstance(selection, ref.HyLRASelection):
                    raise BackendError(f"hylra: layer {layer_idx} reuses layer {layer.source}'s selection, but "
                                       "that layer made none in this forward pass")
                if selection.per_head and selection.blocks.shape[1] != qs.shape[1]:
                    raise BackendError(f"hylra: layer {layer_idx} has {qs.shape[1]} query heads but its source "
                                       f"selected for {selection.blocks.shape[1]}")
            return kern.attend(qs, cache.k, cache.v, m, selection)

        return attend_by_prefill_mode(self.params["prefill"], q, meta, sparse,
                                      lambda qs, m: dense_kern.paged_attention(qs, cache.k, cache.v, m))

    def free_sequence(self, seq_id: int) -> None:
        pass  # no per-sequence state: the aux tables live with the cache blocks
