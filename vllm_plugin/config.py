"""The plugin's configuration: vLLM's additional_config["longserve"] checked and turned into a backend.

{"attention": "dense|superlinear|hylra|routing", "attention_config": {...method parameters...},
 "policy": "FILE.json", "attention_impl": "auto|torch|triton"}; every key optional (no section: dense).
A policy file's method wins over "attention", as in `longserve serve`. Every problem is a BackendError
with one line naming it, raised while vLLM builds its configuration (before any model is loaded).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..kernels.base import BackendError, BackendSetup
from ..kernels.plan import AttentionPlan
from ..kernels.registry import build_backend

SECTION = "longserve"
KEYS = ("attention", "attention_config", "policy", "attention_impl")


def build_from_section(section: Any, model_info: dict[str, Any], setup: BackendSetup):
    """The PlannedBackend that additional_config["longserve"] asks for, on a model described by model_info
    (architecture, num_layers, num_heads, num_kv_heads, head_dim: whole-model figures, before any sharding),
    checked against what one worker runs (setup: its heads, block size, dtype, device)."""
    try:
        backend = _build(section, model_info)
        backend.check(setup)
    except BackendError as e:
        raise BackendError(str(e) if str(e).startswith("longserve") else f"longserve: {e}") from None
    return backend


def _build(section: Any, model_info: dict[str, Any]):
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise BackendError(f"longserve: additional_config.{SECTION} must be an object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise BackendError(f"longserve: unknown key(s) {', '.join(unknown)} in additional_config.{SECTION} "
                           f"(known: {', '.join(KEYS)})")
    method = section.get("attention", "dense")
    params = section.get("attention_config") or {}
    impl = section.get("attention_impl", "auto")
    if not isinstance(method, str):
        raise BackendError(f"longserve: 'attention' must be a method name, got {method!r}")
    if not isinstance(params, dict):
        raise BackendError("longserve: 'attention_config' must be an object of method parameters")
    if impl not in ("auto", "torch", "triton"):
        raise BackendError(f"longserve: attention_impl must be auto, torch or triton, got {impl!r}")
    if section.get("policy"):
        plan = AttentionPlan.load(section["policy"])
        plan.check_model(model_info)
        return build_backend(plan=plan, params=params, impl=impl)
    return build_backend(method, model_info["num_layers"], params, impl=impl)


def check_stages(plan: AttentionPlan, stage_ranges: Sequence[tuple[int, int]]) -> None:
    """Refuse a reuse layer whose source layer runs on another pipeline stage ([start, end) layer ranges):
    a selection lives only within one stage's forward pass."""
    def stage_of(layer: int) -> int:
        return next(i for i, (start, end) in enumerate(stage_ranges) if start <= layer < end)

    for i, lp in enumerate(plan.layers):
        if lp.mode == "reuse" and stage_of(i) != stage_of(lp.source):
            raise BackendError(f"longserve: policy layer {i} reuses layer {lp.source}'s selection, but layer {lp.source} "
                               f"runs on pipeline stage {stage_of(lp.source)} and layer {i} on stage {stage_of(i)} "
                               "(choose a pipeline split that keeps them together, or another policy)")


def check_local_layers(plan: AttentionPlan, layers: Sequence[int]) -> None:
    """The same rule for the layers one worker holds (what it can actually see)."""
    held = set(layers)
    for i in sorted(held):
        if i >= len(plan.layers):
            raise BackendError(f"longserve: the model has attention layer {i} but the plan has {len(plan.layers)} layers")
        lp = plan.layers[i]
        if lp.mode == "reuse" and lp.source not in held:
            raise BackendError(f"longserve: policy layer {i} reuses layer {lp.source}'s selection, but layer {lp.source} "
                               "is not on this worker's pipeline stage")
