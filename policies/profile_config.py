"""The profiler's settings, free of torch so that `longserve --help` (policies/cli.py) stays light."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ProfileError(ValueError):
    """Bad profiler input (reported in one line by the CLI)."""


@dataclass
class ProfileConfig:
    topk_tokens: int = 2048  # the budget the policy is made for (tokens per selection)
    sink_blocks: int = 1
    recent_blocks: int = 4
    block_size: int = 64  # selection granularity while profiling (the GPU default KV block size)
    full_layers: int | None = None  # number of FULL layers (default 2 when neither this nor sparsity)
    sparsity: float | None = None  # share of sparse layers: ceil(L * (1 - sparsity)) layers become FULL
    max_compute_layers: int | None = None  # default: half the non-FULL layers, rounded up
    chunk_tokens: int = 512  # prefill chunk (long inputs run chunked through the paged cache)
    max_seq_tokens: int = 8192  # longer calibration documents are cut into pieces of this size
    probe_every: int = 16  # probe one query position in this many
    min_probe_context: int | None = None  # default: 2 * topk_tokens (so the budget is at most half the context)
    mass_threshold: float = 0.9
    # Method search: the methods a non-FULL layer may run, the other methods' parameters ({"superlinear": {...}};
    # HyLRA's come from the fields above), and the output error a layer's method may make (see profiler.py).
    methods: tuple[str, ...] = ("hylra",)
    method_params: dict = field(default_factory=dict)
    max_error: float = 0.05

    def validate(self) -> None:
        from longserve.kernels.hylra import validate_params  # imports torch: only when a profile runs

        validate_params({"topk_tokens": self.topk_tokens, "sink_blocks": self.sink_blocks,
                         "recent_blocks": self.recent_blocks})
        for name in ("block_size", "chunk_tokens", "max_seq_tokens", "probe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProfileError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.full_layers is not None and self.sparsity is not None:
            raise ProfileError("give either --full-layers or --sparsity, not both")
        if self.full_layers is not None and self.full_layers < 0:
            raise ProfileError(f"full-layers must be >= 0, got {self.full_layers}")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise ProfileError(f"sparsity must be within [0, 1], got {self.sparsity}")
        if self.max_compute_layers is not None and self.max_compute_layers < 1:
            raise ProfileError(f"max-compute-layers must be >= 1, got {self.max_compute_layers}")
        if not 0.0 < self.mass_threshold <= 1.0:
            raise ProfileError(f"mass threshold must be within (0, 1], got {self.mass_threshold}")
        self._validate_methods()

    def _validate_methods(self) -> None:
        from longserve.kernels.superlinear import backend_params

        searchable = ("hylra", "superlinear")
        if not self.methods or len(set(self.methods)) != len(self.methods) or \
                any(m not in searchable for m in self.methods):
            raise ProfileError(f"methods must be distinct names among {', '.join(searchable)}, got "
                               f"{','.join(self.methods) or 'none'}")
        for m, values in self.method_params.items():
            if m not in self.methods or m == "hylra" or not isinstance(values, dict):
                raise ProfileError(f"method-config: parameters are given per searched method other than hylra "
                                   f"(as {{\"superlinear\": {{...}}}}), got {m!r}")
        if "superlinear" in self.methods:
            params = backend_params(self.method_params.get("superlinear"))
            if params.combine != "union":
                raise ProfileError("the profiler measures superlinear with combine='union' only")
            if params.search == "summary" and params.window + 1 < self.block_size:
                raise ProfileError(f"superlinear: summary search needs a window of at least block-size - 1 = "
                                   f"{self.block_size - 1} keys (sw_index {params.sw_index} gives {params.window})")
        if not isinstance(self.max_error, (int, float)) or isinstance(self.max_error, bool) or self.max_error < 0:
            raise ProfileError(f"max-error must be a number >= 0, got {self.max_error!r}")

    @property
    def probe_context(self) -> int:
        return self.min_probe_context if self.min_probe_context is not None else 2 * self.topk_tokens

    def num_full(self, num_layers: int) -> int:
        if self.sparsity is not None:
            return min(num_layers, math.ceil(num_layers * (1.0 - self.sparsity) - 1e-9))
        return min(num_layers, 2 if self.full_layers is None else self.full_layers)
