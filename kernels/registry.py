"""Build the engine's attention backend from a plan: full layers run dense, the others the plan's method."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .base import AttentionMetadata, BackendError, LayerCache, StepState
from .dense import DenseBackend
from .plan import AttentionPlan

# method name -> "module:class"; each class is constructed as cls(plan, impl=...) and validates plan.params.
METHODS = {
    "dense": None,
    "superlinear": "longserve.kernels.superlinear:SuperlinearBackend",
    "hylra": "longserve.kernels.hylra:HyLRABackend",
    "routing": "longserve.kernels.routing:RoutingBackend",
}


def method_class(name: str) -> Any:
    if name not in METHODS:
        raise BackendError(f"unknown attention method {name!r} (expected one of {', '.join(METHODS)})")
    target = METHODS[name]
    if target is None:
        return None
    module, cls = target.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise BackendError(f"attention method {name!r} is not available in this build: {e}") from None


class PlannedBackend:
    """Routes each layer to dense attention or to the plan's sparse method."""

    def __init__(self, plan: AttentionPlan, impl: str = "auto"):
        self.plan = plan
        self.name = plan.method
        self.dense = DenseBackend(impl)
        cls = method_class(plan.method)
        self.method = cls(plan, impl=impl) if cls is not None else None
        if self.method is None and any(lp.mode != "full" for lp in plan.layers):
            raise BackendError("a dense plan can only contain 'full' layers")

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return self.method.aux_specs(num_kv_heads, head_dim) if self.method is not None else {}

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        if self.method is None or self.plan.layers[layer_idx].mode == "full":
            return self.dense.forward(layer_idx, q, k, v, cache, meta, state)
        return self.method.forward(layer_idx, q, k, v, cache, meta, state)

    def free_sequence(self, seq_id: int) -> None:
        if self.method is not None:
            self.method.free_sequence(seq_id)


def build_backend(method: str = "dense", num_layers: int | None = None, params: dict | None = None,
                  plan: AttentionPlan | None = None, impl: str = "auto") -> PlannedBackend:
    """A backend for `method` on every layer, or for a loaded plan (policy file)."""
    if plan is None:
        if num_layers is None:
            raise ValueError("num_layers is needed when no plan is given")
        method_class(method)
        plan = AttentionPlan.default(method, num_layers, params)
    elif params:
        plan.params = {**plan.params, **params}
    return PlannedBackend(plan, impl)
