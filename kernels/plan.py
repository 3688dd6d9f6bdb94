"""The per-layer attention plan: which method and mode each layer runs, and its JSON (policy file) form.

A plan is what backends consume; policies/ produces plan files offline (profiler, DP), the engine loads
them here without importing policies/.

Policy JSON (format "longserve-policy/2"):
{
  "format": "longserve-policy/2",
  "method": "hylra",                      # optional: the method of sparse layers that name none
  "params": {"hylra": {"topk_tokens": 2048}, "superlinear": {"sw_index": 15}},   # per method
  "model": {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
            "head_dim": 64, "fingerprint": "..."},
  "layers": [{"mode": "full"}, {"mode": "compute"}, {"mode": "reuse", "source": 1},
             {"mode": "compute", "method": "superlinear"}, ...],
  "profile": {...}                        # optional: the figures the profiler measured
}
Modes: "full" = dense attention; "compute" = the layer's method selects for itself; "reuse" = attend to what
layer `source` (an earlier "compute" layer) selected in the same forward pass. A reuse layer runs its source's
method: each method's selection has its own form (HyLRA: logical blocks per query tile; superlinear: key
spans per token and query head beside a window; routing: key positions per tile and KV head), so a reuse layer
naming another method than its source's is refused.

Format "longserve-policy/1" (still read): one "method" for every sparse layer, "params" that method's
parameters, layers without "method".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import BackendError

POLICY_FORMAT = "longserve-policy/2"
FORMAT_1 = "longserve-policy/1"
MODES = ("full", "compute", "reuse")
METHODS = ("dense", "superlinear", "hylra", "routing")  # kernels/registry.py maps each to its backend
SPARSE_METHODS = METHODS[1:]


@dataclass(frozen=True)
class LayerPlan:
    mode: str  # "full" | "compute" | "reuse"
    source: int | None = None  # for reuse: the layer whose selection is taken
    method: str | None = None  # compute/reuse: the layer's sparse method; None = the plan's `method`


@dataclass
class AttentionPlan:
    method: str  # the plan's method: every sparse layer without a method of its own runs it
    layers: list[LayerPlan]
    params: dict[str, Any] = field(default_factory=dict)  # parameters of `method`
    model: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # parameters of the other methods

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

    # -- per-layer methods ------------------------------------------------------------------------------------
    def layer_method(self, i: int) -> str:
        """The method layer i runs: "dense" for full layers; a reuse layer runs its source's method."""
        lp = self.layers[i]
        if lp.mode == "full":
            return "dense"
        if (lp.mode == "reuse" and lp.method is None and lp.source is not None and 0 <= lp.source < i
                and self.layers[lp.source].mode == "compute"):
            return self.layer_method(lp.source)
        return lp.method or self.method

    def methods(self) -> list[str]:
        """The sparse methods the plan's layers run, in order of first use."""
        out: list[str] = []
        for i in range(len(self.layers)):
            m = self.layer_method(i)
            if m != "dense" and m not in out:
                out.append(m)
        return out

    def params_of(self, method: str) -> dict[str, Any]:
        return self.params if method == self.method else self.method_params.get(method, {})

    def for_method(self, method: str) -> "AttentionPlan":
        """The single-method plan one method's backend is built from: its layers keep their modes, every other
        layer reads as "full" (the per-layer router never hands it to this method)."""
        layers = [LayerPlan(lp.mode, lp.source) if self.layer_method(i) == method else LayerPlan("full")
                  for i, lp in enumerate(self.layers)]
        return AttentionPlan(method, layers, dict(self.params_of(method)), self.model, self.profile)

    def with_params(self, overrides: dict[str, Any] | None) -> "AttentionPlan":
        """A copy with parameters overridden: {method: {...}, ...} per method, or a flat dict for `method`."""
        if not overrides:
            return self
        per_method = overrides if all(isinstance(k, str) and k in METHODS for k in overrides) else {self.method: overrides}
        params, others = dict(self.params), {m: dict(p) for m, p in self.method_params.items()}
        for m, values in per_method.items():
            if not isinstance(values, dict):
                raise BackendError(f"attention parameters for {m} must be an object, got {values!r}")
            if m == self.method:
                params.update(values)
            else:
                others[m] = {**others.get(m, {}), **values}
        return AttentionPlan(self.method, list(self.layers), params, self.model, self.profile, others)

    def validate(self, num_layers: int | None = None) -> None:
        if num_layers is not None and len(self.layers) != num_layers:
            raise BackendError(f"policy has {len(self.layers)} layers but the model has {num_layers}")
        for m in self.method_params:
            if m not in METHODS:
                raise BackendError(f"policy params: unknown method {m!r} (expected one of {', '.join(METHODS)})")
        for i, lp in enumerate(self.layers):
            if lp.mode not in MODES:
                raise BackendError(f"policy layer {i}: unknown mode {lp.mode!r} (expected one of {', '.join(MODES)})")
            if lp.method is not None and lp.method not in METHODS:
                raise BackendError(f"policy layer {i}: unknown method {lp.method!r} "
                                   f"(expected one of {', '.join(METHODS)})")
            if lp.mode == "full":
                if lp.method not in (None, "dense"):
                    raise BackendError(f"policy layer {i}: a 'full' layer runs dense attention, not {lp.method!r}")
            elif self.layer_method(i) == "dense":
                raise BackendError(f"policy layer {i}: a '{lp.mode}' layer needs a sparse method "
                                   f"({', '.join(SPARSE_METHODS)}); dense layers are 'full'")
            if lp.mode == "reuse":
                if lp.source is None:
                    raise BackendError(f"policy layer {i}: mode 'reuse' needs a 'source' layer")
                if not 0 <= lp.source < i:
                    raise BackendError(f"policy layer {i}: reuse source {lp.source} must be an earlier layer (0..{i - 1})")
                if self.layers[lp.source].mode != "compute":
                    raise BackendError(
                        f"policy layer {i}: reuse source {lp.source} is a '{self.layers[lp.source].mode}' layer; "
                        "it must be a 'compute' layer")
                own, theirs = self.layer_method(i), self.layer_method(lp.source)
                if own != theirs:
                    raise BackendError(
                        f"policy layer {i}: a {own} layer cannot reuse layer {lp.source}'s {theirs} selection "
                        "(a reuse layer attends to its source's selection, so it runs its source's method)")
            elif lp.source is not None:
                raise BackendError(f"policy layer {i}: 'source' is only allowed with mode 'reuse'")
        if self.method not in METHODS:
            raise BackendError(f"unknown attention method {self.method!r} (expected one of {', '.join(METHODS)})")

    def check_model(self, model_info: dict[str, Any]) -> None:
        """Refuse a policy profiled for another model (architecture or attention shape)."""
        for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if key in self.model and key in model_info and self.model[key] != model_info[key]:
                raise BackendError(
                    f"policy was made for {key}={self.model[key]!r} but the model has {key}={model_info[key]!r}")
        self.validate(model_info.get("num_layers"))

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        layers = []
        for lp in self.layers:
            entry: dict[str, Any] = {"mode": lp.mode}
            if lp.method is not None:
                entry["method"] = lp.method
            if lp.source is not None:
                entry["source"] = lp.source
            layers.append(entry)
        params = {self.method: self.params, **self.method_params} if self.params or self.method_params else {}
        out = {"format": POLICY_FORMAT, "method": self.method, "params": params, "model": self.model,
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
        fmt = data.get("format", FORMAT_1)
        if fmt not in (FORMAT_1, POLICY_FORMAT):
            raise BackendError(f"policy format {fmt!r} is not {POLICY_FORMAT!r} (or {FORMAT_1!r})")
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
            method = entry.get("method")
            if method is not None and (fmt == FORMAT_1 or not isinstance(method, str)):
                raise BackendError(f"policy layer {i}: 'method' must be a string (and needs format {POLICY_FORMAT!r})")
            layers.append(LayerPlan(entry["mode"], src, method))
        method = data.get("method")
        if method is None and fmt == POLICY_FORMAT:  # every sparse layer names its method
            method = next((lp.method for lp in layers if lp.mode != "full" and lp.method), "dense")
        if not isinstance(method, str):
            raise BackendError("policy needs a string 'method' (dense, superlinear, hylra, routing)")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("policy 'params' must be an object")
        others: dict[str, dict[str, Any]] = {}
        if fmt == POLICY_FORMAT:
            for m, values in params.items():
                if m not in METHODS or not isinstance(values, dict):
                    raise BackendError(f"policy 'params' maps method names ({', '.join(METHODS)}) to objects; "
                                       f"got {m!r}: {values!r}")
            others = {m: dict(v) for m, v in params.items() if m != method}
            params = dict(params.get(method) or {})
        plan = cls(method, layers, params, dict(data.get("model") or {}), dict(data.get("profile") or {}), others)
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
