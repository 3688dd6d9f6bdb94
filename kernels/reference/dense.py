"""PyTorch reference for the dense paged path: cache write, K/V gather, causal attention over the cache.

This is the oracle the Triton kernels are tested against and the path the engine runs on CPU.
"""

from __future__ import annotations

import torch

from ..base import AttentionMetadata

# Keep the [Hq, q_tile, keys] score tensor under this many elements (about 128 MB in float32).
_MAX_SCORE_ELEMENTS = 1 << 25


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's k/v [T, Hkv, D] into caches [num_blocks, Hkv, block_size, D] at slot_mapping."""
    block_size = k_cache.shape[2]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping % block_size
    # Advanced indexing puts the T axis first: k_cache[blocks, :, offsets] has shape [T, Hkv, D].
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's keys (or values) from the paged cache as a contiguous [Hkv, context_len, D]."""
    block_size = cache.shape[2]
    num_blocks = (context_len + block_size - 1) // block_size
    # indexing the head-major view copies once, straight into [Hkv, nb, bs, D] (the reshape is then free)
    blocks = cache.transpose(0, 1)[:, block_table[:num_blocks].long()]
    return blocks.reshape(cache.shape[1], num_blocks * block_size, cache.shape[3])[:, :context_len]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32. q [Hq, M, D], k/v [Hkv, N, D] (GQA by head // group), mask [Hq or 1, M, N]
    bool (True = attend) or None. Returns out [Hq, M, D] float32 and lse [Hq, M] (-inf where nothing attended;
    such rows output 0)."""
    hq, hkv = q.shape[0], k.shape[0]
    group = hq // hkv
    qf = q.float().reshape(hkv, group * q.shape[1], q.shape[2])
    scores = torch.bmm(qf, k.float().transpose(1, 2)).reshape(hq, q.shape[1], k.shape[1]) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.bmm(probs.reshape(hkv, group * q.shape[1], k.shape[1]), v.float()).reshape(hq, q.shape[1], v.shape[2])
    return out, lse


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Dense causal attention of queries q [M, Hq, D] at absolute q_positions [M] over keys k/v
    [Hkv, N, D] at positions 0..N-1. Tiled over queries so long contexts fit in memory. Returns [M, Hq, D]."""
    m, hq, d = q.shape
    n = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(m, hq, d, dtype=q.dtype, device=q.device)
    tile = max(1, _MAX_SCORE_ELEMENTS // max(1, hq * n))
    key_pos = torch.arange(n, device=q.device)
    for s in range(0, m, tile):
        e = min(m, s + tile)
        mask = (key_pos[None, :] <= q_positions[s:e, None])[None]
        o, _ = attention_with_lse(q[s:e].transpose(0, 1), k, v, mask, scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float | None = None) -> torch.Tensor:
    """Dense attention of every step token over its sequence's paged cache (already written). [T, Hq, D]."""
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        ctx = meta.context_lens_cpu[i]
        sl = meta.query_slice(i)
        if sl.stop == sl.start:
            continue
        k = gather_kv(k_cache, meta.block_tables[i], ctx)
        v = gather_kv(v_cache, meta.block_tables[i], ctx)
        out[sl] = causal_attention(q[sl], k, v, meta.positions[sl], scale)
    return out
