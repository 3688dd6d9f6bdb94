"""The per-layer attention plan: which method each layer runs, and its JSON (policy file) form.

A plan is what backends consume; policies/ produces plan files offline (profiler, DP), the engine loads
them here without importing policies/.

Policy JSON (format "longserve-policy/1"):
{
  "format": "longserve-policy/1",
  "method": "hylra",                      # sparse method of the non-full layers
  "params": {"topk_tokens": 2048, ...},   # method parameters (validated by the backend)
  "model": {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
            "head_dim": 64, "fingerprint": "..."},
  "layers": [{"mode": "full"}, {"mode": "compute"}, {"mode": "reuse", "source": 1}, ...],
  "profile": {...}                        # optional: the figures the profiler measured
}
Modes: "full" = dense attention; "compute" = the method selects for itself; "reuse" = attend to what
layer `source` (an earlier "compute" layer) selected in the same forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BackendError

POLICY_FORMAT = "longserve-policy/1"
MODES = ("full", "compute", "reuse")


@dataclass(frozen=True)
class LayerPlan:
    mode: str  # "full" | "compute" | "reuse"
    source: int | None = None  # for reuse: the layer whose selection is taken


@dataclass
class AttentionPlan:
    method: str  # "dense", "superlinear", "hylra", "routing"
    layers: list[LayerPlan]
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, method: str, num_layers: int, params: dict[str, Any] | None = None) -> "AttentionPlan":
        mode = "full" if method == "dense" else "compute"
        return cls(method, [LayerPlan(mode) for _ in range(num_layers)], dict(params or {}))

    @classmethod
    def default(cls, method: str, num_layers: int, params: dict[str, Any] | None = None) -> "AttentionPlan":
        """The plan used when no policy file is given: uniform, except that HyLRA keeps its first
        min(2, num_layers // 2) layers dense (early layers attend broadly; every other layer computes
        its own top-k)."""
        plan = cls.uniform(method, num_layers, params)
        if method == "hylra":
            for i in range(min(2, num_layers // 2)):
                plan.layers[i] = LayerPlan("full")
        return plan

    def validate(self, num_layers: int | None = None) -> None:
        if num_layers is not None and len(self.layers) != num_layers:
            raise BackendError(f"policy has {len(self.layers)} layers but the model has {num_layers}")
        for i, lp in enumerate(self.layers):
            if lp.mode not in MODES:
                raise BackendError(f"policy layer {i}: unknown mode {lp.mode!r} (expected one of {', '.join(MODES)})")
            if lp.mode == "reuse":
                if lp.source is None:
                    raise BackendError(f"policy layer {i}: mode 'reuse' needs a 'source' layer")
                if not 0 <= lp.source < i:
                    raise BackendError(f"policy layer {i}: reuse source {lp.source} must be an earlier layer (0..{i - 1})")
                if self.layers[lp.source].mode != "compute":
                    raise BackendError(
                        f"policy layer {i}: reuse source {lp.source} is a '{self.layers[lp.source].mode}' layer; "
                        "it must be a 'compute' layer")
            elif lp.source is not None:
                raise BackendError(f"policy layer {i}: 'source' is only allowed with mode 'reuse'")

    def check_model(self, model_info: dict[str, Any]) -> None:
        """Refuse a policy profiled for another model (architecture or attention shape)."""
        for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if key in self.model and key in model_info and self.model[key] != model_info[key]:
                raise BackendError(
                    f"policy was made for {key}={self.model[key]!r} but the model has {key}={model_info[key]!r}")
        self.validate(model_info.get("num_layers"))

    def to_json(self) -> dict[str, Any]:
        layers = [{"mode": lp.mode, **({"source": lp.source} if lp.source is not None else {})} for lp in self.layers]
        out = {"format": POLICY_FORMAT, "method": self.method, "params": self.params, "model": self.model,
               "layers": layers}
        if self.profile:
            out["profile"] = self.profile
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: Any) -> "AttentionPlan":
        if not isinstance(data, dict):
            raise BackendError("policy must be a JSON object")
        if data.get("format", POLICY_FORMAT) != POLICY_FORMAT:
            raise BackendError(f"policy format {data.get('format')!r} is not {POLICY_FORMAT!r}")
        method = data.get("method")
        if not isinstance(method, str):
            raise BackendError("policy needs a string 'method' (dense, superlinear, hylra, routing)")
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, list) or not layers_raw:
            raise BackendError("policy needs a non-empty 'layers' list")
        layers = []
        for i, entry in enumerate(layers_raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("mode"), str):
                raise BackendError(f"policy layer {i}: expected an object with a string 'mode'")
            src = entry.get("source")
            if src is not None and (not isinstance(src, int) or isinstance(src, bool)):
                raise BackendError(f"policy layer {i}: 'source' must be an integer layer index")
            layers.append(LayerPlan(entry["mode"], src))
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("policy 'params' must be an object")
        plan = cls(method, layers, params, dict(data.get("model") or {}), dict(data.get("profile") or {}))
        plan.validate()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "AttentionPlan":
        p = Path(path)
        if not p.is_file():
            raise BackendError(f"policy file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise BackendError(f"policy file {p} is not valid JSON: {e.msg} (line {e.lineno})") from None
        return cls.from_json(data)
