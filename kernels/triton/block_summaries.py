"""Per-block key summaries (kmin / kmax / kmean aux tables) refreshed after a step's cache write, and the Quest
bound over them (a device function for scoring kernels), Triton: one implementation for every method that
scores blocks (HyLRA, superlinear's summary search). Semantics and the PyTorch reference:
kernels/reference/block_summaries.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_same_device, next_power_of_2


@triton.jit
def _update_summaries_kernel(k_cache, kmin, kmax, kmean, slot_mapping, num_tokens,
                             s_kb, s_kh, s_ko, s_mb, s_mh,
                             BS: tl.constexpr, BS_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BOUNDS: tl.constexpr, MEAN: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    block = slot // BS  # int64: offsets into a cache of more than 2^31 elements
    offset = slot % BS
    # Only the step's last token in a block recomputes it (its offset is the block's fill - 1): one writer per
    # block, and a sequence's tokens fill a block contiguously and in order.
    next_slot = tl.load(slot_mapping + t + 1, mask=t + 1 < num_tokens, other=-1).to(tl.int64)
    is_last = (t + 1 >= num_tokens) | (next_slot < 0) | (next_slot // BS != block)
    if (slot >= 0) & is_last:
        rows = tl.arange(0, BS_PAD)
        cols = tl.arange(0, BLOCK_D)
        valid = (rows[:, None] <= offset) & (rows[:, None] < BS) & (cols[None, :] < D)
        ptrs = k_cache + block * s_kb + h * s_kh + rows[:, None] * s_ko + cols[None, :]
        keys = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        out = block * s_mb + h * s_mh + cols
        if BOUNDS:
            lo = tl.min(tl.where(valid, keys, float("inf")), axis=0)
            hi = tl.max(tl.where(valid, keys, float("-inf")), axis=0)
            tl.store(kmin + out, lo.to(kmin.dtype.element_ty), mask=cols < D)
            tl.store(kmax + out, hi.to(kmax.dtype.element_ty), mask=cols < D)
        if MEAN:
            mean = tl.sum(keys, axis=0) / (offset + 1).to(tl.float32)
            tl.store(kmean + out, mean.to(kmean.dtype.element_ty), mask=cols < D)


@triton.jit
def quest_bound(q, kmin, kmax, IEEE: tl.constexpr):
    """[M, N] Quest upper bound of q . k for queries q [M, D] over N blocks whose keys lie within kmin / kmax
    [N, D]: relu(q) . kmax + min(q, 0) . kmin, accumulated in float32. IEEE: exact float32 products (float32
    data, the CPU interpreter); else tensor cores in the tables' 16-bit type."""
    if IEEE:
        ub = tl.dot(tl.maximum(q, 0.0).to(tl.float32), tl.trans(kmax).to(tl.float32), input_precision="ieee")
        ub += tl.dot(tl.minimum(q, 0.0).to(tl.float32), tl.trans(kmin).to(tl.float32), input_precision="ieee")
    else:
        ub = tl.dot(tl.maximum(q, 0.0).to(kmax.dtype), tl.trans(kmax))
        ub += tl.dot(tl.minimum(q, 0.0).to(kmin.dtype), tl.trans(kmin))
    return ub


def update_block_summaries(k_cache: torch.Tensor, aux: dict[str, torch.Tensor], slot_mapping: torch.Tensor) -> None:
    """Recompute the summaries present in aux (kmin and kmax, kmean) of every block the step wrote."""
    num_tokens = slot_mapping.shape[0]
    bounds, mean = "kmin" in aux, "kmean" in aux
    if num_tokens == 0 or not (bounds or mean):
        return
    first = aux["kmin"] if bounds else aux["kmean"]
    kmin, kmax, kmean = aux.get("kmin", first), aux.get("kmax", first), aux.get("kmean", first)
    check_same_device(k_cache=k_cache, summaries=first, slot_mapping=slot_mapping)
    if k_cache.stride(3) != 1 or first.stride(2) != 1 or any(t.stride() != first.stride() for t in (kmax, kmean)):
        raise ValueError("the key cache and the summary tables need a contiguous last dimension, the tables one "
                         "layout")
    _, hkv, bs, d = k_cache.shape
    _update_summaries_kernel[(num_tokens, hkv)](
        k_cache, kmin, kmax, kmean, slot_mapping, num_tokens,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), first.stride(0), first.stride(1),
        BS=bs, BS_PAD=next_power_of_2(bs), D=d, BLOCK_D=next_power_of_2(d), BOUNDS=bounds, MEAN=mean, num_warps=2)


def update_block_bounds(k_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """update_block_summaries for the min/max tables only."""
    update_block_summaries(k_cache, {"kmin": kmin, "kmax": kmax}, slot_mapping)
