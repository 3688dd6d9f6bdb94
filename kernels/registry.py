"""Build the engine's attention backend from a plan: full layers run dense, every other layer its own method."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .base import AttentionMetadata, BackendError, BackendSetup, LayerCache, StepState
from .dense import DenseBackend
from .plan import METHODS as METHOD_NAMES
from .plan import AttentionPlan

# method name -> "module:class"; each class is constructed as cls(plan, impl=...) from a single-method plan
# (AttentionPlan.for_method) and validates plan.params.
METHODS = {
    "dense": None,
    "superlinear": "longserve.kernels.superlinear:SuperlinearBackend",
    "hylra": "longserve.kernels.hylra:HyLRABackend",
    "routing": "longserve.kernels.routing:RoutingBackend",
}
assert tuple(METHODS) == METHOD_NAMES


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
    """Routes each layer to dense attention or to its own method's backend (one instance per method).

    The layers share one StepState per forward pass, so a reuse layer finds its source's selection whatever
    else runs between them."""

    def __init__(self, plan: AttentionPlan, impl: str = "auto"):
        plan.validate()
        self.plan = plan
        self.dense = DenseBackend(impl)
        self.methods = {m: method_class(m)(plan.for_method(m), impl=impl) for m in plan.methods()}
        self.name = "+".join(self.methods) if len(self.methods) > 1 else plan.method
        # The plan's own method (its only one unless mixed); None for dense plans.
        self.method = self.methods.get(plan.method)
        self._layers = [self.methods.get(plan.layer_method(i), self.dense) for i in range(len(plan.layers))]

    def layer_backend(self, layer_idx: int):
        return self._layers[layer_idx]

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        """The union of the methods' per-block tables (allocated for every layer; each layer's method writes
        only its own). Two methods may share a table name only with the same shape and dtype."""
        specs: dict = {}
        owner: dict[str, str] = {}
        for name, backend in self.methods.items():
            for table, spec in backend.aux_specs(num_kv_heads, head_dim).items():
                if table in specs and specs[table] != spec:
                    raise BackendError(f"attention methods {owner[table]} and {name} both need an aux table "
                                       f"{table!r} but of different shapes or dtypes ({specs[table]} vs {spec})")
                specs.setdefault(table, spec)
                owner.setdefault(table, name)
        return specs

    def check(self, setup: BackendSetup) -> None:
        """Every backend of the plan checks the engine's model shape, block size, dtype, device and
        implementation (BackendError, one line): called when the engine is built, before any step."""
        self.dense.check(setup)
        for backend in self.methods.values():
            backend.check(setup)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        return self._layers[layer_idx].forward(layer_idx, q, k, v, cache, meta, state)

    def free_sequence(self, seq_id: int) -> None:
        for backend in self.methods.values():
            backend.free_sequence(seq_id)

    def state_bytes(self) -> int | None:
        """Per-sequence state the methods hold (routing's cluster tables); None when no method keeps any."""
        holders = [b for b in self.methods.values() if hasattr(b, "state_bytes")]
        return sum(int(b.state_bytes()) for b in holders) if holders else None


def build_backend(method: str = "dense", num_layers: int | None = None, params: dict | None = None,
                  plan: AttentionPlan | None = None, impl: str = "auto") -> PlannedBackend:
    """A backend for `method` on every layer, or for a loaded plan (policy file). params override the plan's
    parameters: {method: {...}} per method, or a flat dict for the plan's method."""
    if plan is None:
        if num_layers is None:
            raise ValueError("num_layers is needed when no plan is given")
        method_class(method)
        plan = AttentionPlan.default(method, num_layers)
    return PlannedBackend(plan.with_params(params), impl)
