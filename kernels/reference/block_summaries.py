"""Per-block key summaries and the Quest bound, PyTorch: one implementation for every method that scores blocks
(HyLRA's block selection, superlinear's summary search). Triton twin: kernels/triton/block_summaries.py.

Tables (aux of a LayerCache, each [num_blocks, Hkv, D], any subset present):
  kmin / kmax   elementwise minimum / maximum of the block's keys
  kmean         mean of the block's keys (computed in float32, rounded once to the table's dtype)
Quest bound (arXiv 2406.10774): max over a block's keys k of q . k <= sum_d max(q_d kmin_d, q_d kmax_d)
= relu(q) . kmax + min(q, 0) . kmin (a positive q_d takes kmax_d, a negative one kmin_d).
"""

from __future__ import annotations

import torch


def update_block_summaries(k_cache: torch.Tensor, aux: dict[str, torch.Tensor], slot_mapping: torch.Tensor) -> None:
    """Recompute the summaries present in aux of every block the step wrote, over the block's filled part.

    A block is filled from offset 0 upwards, so its valid tokens are offsets 0..(largest offset written now);
    recomputing (rather than merging) ignores whatever a freed and reused block held before, and blocks the
    step did not write (shared prefixes) keep theirs.
    """
    if slot_mapping.numel() == 0 or not any(name in aux for name in ("kmin", "kmax", "kmean")):
        return
    bs = k_cache.shape[2]
    slot_mapping = slot_mapping.to(torch.int64)
    blocks = torch.div(slot_mapping, bs, rounding_mode="floor")
    offsets = slot_mapping % bs
    touched, inverse = torch.unique(blocks, return_inverse=True)
    fill = torch.zeros_like(touched).scatter_reduce(0, inverse, offsets + 1, reduce="amax")
    valid = (torch.arange(bs, device=k_cache.device)[None, :] < fill[:, None])[:, None, :, None]  # [nb,1,bs,1]
    keys = k_cache[touched]  # [nb, Hkv, bs, D], float32 (float64 caches stay float64: the tests' oracle)
    keys = keys if keys.dtype == torch.float64 else keys.float()
    inf = torch.tensor(float("inf"), device=k_cache.device)
    if "kmin" in aux:
        aux["kmin"][touched] = torch.where(valid, keys, inf).amin(dim=2).to(aux["kmin"].dtype)
    if "kmax" in aux:
        aux["kmax"][touched] = torch.where(valid, keys, -inf).amax(dim=2).to(aux["kmax"].dtype)
    if "kmean" in aux:
        mean = torch.where(valid, keys, 0.0).sum(dim=2) / fill[:, None, None].to(keys.dtype)
        aux["kmean"][touched] = mean.to(aux["kmean"].dtype)


def summarize_full_blocks(k_cache: torch.Tensor, aux: dict[str, torch.Tensor], num_blocks: int) -> None:
    """The summaries present in aux of blocks [0, num_blocks), every one of them full: for caches written
    directly rather than through steps (benchmarks). Works through the blocks in chunks to bound memory."""
    chunk = max(1, (1 << 24) // k_cache[0].numel())
    for start in range(0, num_blocks, chunk):
        end = min(num_blocks, start + chunk)
        keys = k_cache[start:end].float()
        if "kmin" in aux:
            aux["kmin"][start:end] = keys.amin(dim=2).to(aux["kmin"].dtype)
        if "kmax" in aux:
            aux["kmax"][start:end] = keys.amax(dim=2).to(aux["kmax"].dtype)
        if "kmean" in aux:
            aux["kmean"][start:end] = keys.mean(dim=2).to(aux["kmean"].dtype)


def update_block_bounds(k_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """update_block_summaries for the min/max tables only."""
    update_block_summaries(k_cache, {"kmin": kmin, "kmax": kmax}, slot_mapping)


def block_bounds(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block elementwise min and max of contiguous keys k [Hkv, N, D] over blocks of block_size keys (the
    last block may be partial): ([Hkv, nb, D], [Hkv, nb, D]), in float32 (float64 kept)."""
    hkv, n, d = k.shape
    nb = (n + block_size - 1) // block_size
    pad = nb * block_size - n
    kf = k.float() if k.dtype != torch.float64 else k
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(hkv, nb, block_size, d).amin(2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(hkv, nb, block_size, d).amax(2)
    return lo, hi


def quest_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The Quest upper bound of q . k over each block, in q's dtype. q [Hq, M, D]; kmin/kmax [Hkv, nb, D] (query
    head h uses KV head h // (Hq / Hkv)). Returns [Hq, M, nb]."""
    hq, m, d = q.shape
    hkv = kmin.shape[0]
    qg = q.reshape(hkv, (hq // hkv) * m, d)
    ub = torch.bmm(qg.clamp_min(0), kmax.transpose(1, 2)) + torch.bmm(qg.clamp_max(0), kmin.transpose(1, 2))
    return ub.reshape(hq, m, -1)
