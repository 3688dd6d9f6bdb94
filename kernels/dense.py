"""Dense (full) attention over the paged cache: the baseline every sparse backend is measured against."""

from __future__ import annotations

import torch

from .base import AttentionMetadata, LayerCache, StepState
from .reference import dense as ref


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA, the PyTorch reference elsewhere."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


class DenseBackend:
    name = "dense"

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {}

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
