"""Dense (full) attention over the paged cache: the baseline every sparse backend is measured against."""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import AttentionMetadata, BackendError, BackendSetup, LayerCache, StepState
from .reference import dense as ref


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA, the PyTorch reference elsewhere."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def check_impl(method: str, impl: str, device: torch.device) -> str:
    """The implementation `impl` resolves to on `device`; BackendError when it cannot run there (no CUDA for
    Triton, Triton not installed). The Triton interpreter (TRITON_INTERPRET=1) runs Triton on the CPU."""
    if impl not in ("auto", "torch", "triton"):
        raise BackendError(f"{method}: impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    resolved = resolve_impl(impl, device)
    if resolved == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(f"{method}: impl 'triton' needs a CUDA device but the engine runs on {device.type} "
                               "(use impl 'auto' or 'torch')")
        if importlib.util.find_spec("triton") is None:
            raise BackendError(f"{method}: impl 'triton' needs the triton package, which is not installed")
    return resolved


class DenseBackend:
    name = "dense"

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {}

    def check(self, setup: BackendSetup) -> None:
        if check_impl("dense", self.impl, setup.device) == "triton":
            from .triton import dense as tri

            try:
                tri.check_head_dim(setup.head_dim)
            except ValueError as e:
                raise BackendError(f"dense: {e} for the Triton kernels (use impl 'torch')") from None

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        if resolve_impl(self.impl, q.device) == "triton":
            from .triton import dense as tri  # imported lazily: CPU-only installs never need triton
            tri.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
            return tri.paged_attention(q, cache.k, cache.v, meta)
        ref.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        return ref.paged_attention(q, cache.k, cache.v, meta)

    def free_sequence(self, seq_id: int) -> None:
        pass
