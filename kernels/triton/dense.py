"""Triton kernels for dense attention over the paged KV cache.

Three kernels and one merge (docs/kernels.md has the full story):

* ``write_kv``: scatters the step's new K/V rows into the cache by slot mapping, one program per token
  (all its KV heads); a negative slot is skipped (the padded rows of a CUDA-graph batch).
* split-KV decode (flash-decoding): one program per (sequence, KV head, split). Each program loads the
  whole GQA group's queries as one [G, D] tile (G padded to >= 16 so ``tl.dot`` applies), walks its share
  of the context through the block table with an online softmax, and writes a normalised partial output
  plus its log-sum-exp. A second small kernel merges the splits exactly by their log-sum-exps.
* chunked prefill: one program per (sequence, query tile, KV head); the tile's rows are (token, head of the
  group) pairs, so a group's K/V are read once per tile. Keys below every row's causal limit are processed
  without masks, the diagonal band with the causal mask. Covers a fresh prompt (no prefix), a chunk after a
  cached prefix, and any mix of these with decode tokens in one step.

Layout (kernels/base.py): q [T, Hq, D]; caches [num_blocks, Hkv, block_size, D]; the caches may be any
strided view whose last dimension is contiguous (the GPU suite points a paged view at SDPA's contiguous
K/V so both read the same bytes).

CUDA graphs: the decode path never reads device values on the host. Host lists of the metadata decide only
which kernels run, ``max_query_len`` (prefill grid) and the default split count; each program derives its
own key range from the device tensors, so a graph captured with a split count stays correct for any
context up to the one it was sized for. See ``decode_num_splits``. The split count is a run-time
argument, so changing it never recompiles the decode kernel (the merge kernel compiles once per power of
two of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..base import AttentionMetadata
from .common import cdiv, check_same_device, next_power_of_2, num_sms

# Tests set this to fill the split-KV workspace with NaN first, proving the merge never reads a partial
# result that no program wrote.
POISON_WORKSPACE = False

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
# Decode: how many programs per multiprocessor to aim for. Programs of one decode step do equal work, so
# the grid should be a whole number of "waves" (programs resident at once on every multiprocessor). Once a
# decode kernel has been compiled its residency is known (registers, shared memory, warps): then two full
# waves (the second absorbs unequal sequence lengths). Before that, 12 per multiprocessor, a whole number
# of waves whether 1, 2, 3, 4 or 6 programs fit at a time.
_DECODE_PROGRAMS_PER_SM = 12
_DECODE_WAVES = 2
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 256


def check_head_dim(head_dim: int) -> None:
    if head_dim > _MAX_HEAD_DIM or head_dim < 16:
        raise ValueError(f"head_dim must be between 16 and {_MAX_HEAD_DIM}, got {head_dim}")


@dataclass(frozen=True)
class DenseKernelConfig:
    """Tile sizes and launch parameters. ``default_config`` picks them; tests and the GPU suite may override."""

    decode_block_n: int = 64  # keys per decode iteration
    decode_warps: int = 4
    decode_stages: int = 3
    prefill_rows: int = 128  # (token, head) rows per prefill tile: tokens per tile = rows // G_pad
    prefill_block_n: int = 64
    prefill_warps: int = 8
    prefill_stages: int = 3


def default_config(head_dim: int, dtype: torch.dtype) -> DenseKernelConfig:
    if dtype == torch.float32:
        # Tests only: exact float32 dots run on the CUDA cores, and larger tiles spill registers
        # (bench/kernel_report.py shows it).
        return DenseKernelConfig(decode_block_n=16, decode_stages=2, prefill_rows=16, prefill_block_n=16,
                                 prefill_warps=4, prefill_stages=2)
    if head_dim > 128:  # a 256-wide accumulator: smaller tiles keep registers and shared memory in bounds
        return DenseKernelConfig(decode_block_n=32, prefill_rows=64, prefill_block_n=32, prefill_stages=2)
    return DenseKernelConfig()


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device,
                      block_n: int = 64, resident_per_sm: int | None = None) -> int:
    """How many programs share one (sequence, KV head)'s context in the decode kernel.

    Enough programs for _DECODE_WAVES full waves when the decode kernel's residency is known
    (resident_per_sm; paged_attention passes what it measured from the compiled kernel), else about
    _DECODE_PROGRAMS_PER_SM per multiprocessor; rounded down (a few programs short leave the last wave
    nearly full, a few over would start a nearly empty one); never splits shorter than _MIN_SPLIT_TOKENS.

    Any split count is correct for any context (each program divides its own sequence's context on the
    device), so a CUDA graph captured for a batch bucket may use the count for the longest context it will
    serve and replays correctly at shorter ones.
    """
    if max_context_len <= 0 or num_seqs <= 0:
        return 1
    per_sm = _DECODE_WAVES * resident_per_sm if resident_per_sm else _DECODE_PROGRAMS_PER_SM
    wanted = (per_sm * num_sms(device)) // (num_seqs * num_kv_heads)
    longest_useful = cdiv(max_context_len, max(_MIN_SPLIT_TOKENS, block_n))
    return max(1, min(wanted, longest_useful, _MAX_SPLITS))


# (device, decode kernel specialisation) -> programs of it resident per multiprocessor, read off the
# compiled kernel after its first launch.
_DECODE_RESIDENCY: dict[tuple, int] = {}


def _resident_per_sm(compiled, device: torch.device) -> int | None:
    """Programs of a compiled kernel that fit on one multiprocessor at once, or None where unknown (the
    interpreter, or a Triton whose compiled-kernel object lacks these fields)."""
    if device.type != "cuda" or compiled is None:
        return None
    try:
        regs = int(compiled.n_regs)
        warps = int(compiled.metadata.num_warps)
        shared = int(compiled.metadata.shared)
        props = torch.cuda.get_device_properties(device)
    except Exception:  # a field moved in another Triton version: fall back to the static target
        return None
    return residency(regs, warps, shared, getattr(props, "regs_per_multiprocessor", 65536),
                     getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
                     getattr(props, "max_threads_per_multi_processor", 2048))


def residency(regs: int, warps: int, shared: int, regs_per_sm: int = 65536, shared_per_sm: int = 228 * 1024,
              threads_per_sm: int = 2048) -> int:
    """Blocks of a kernel resident per multiprocessor (defaults: Hopper), from its registers per thread,
    warps per block and shared memory per block."""
    threads = 32 * warps
    by_regs = regs_per_sm // max(1, -(-regs // 8) * 8 * threads)  # registers are allocated 8 per thread at a time
    by_shared = shared_per_sm // (shared + 1024) if shared else 32  # the driver reserves 1 KB per block
    return max(1, min(by_regs, by_shared, threads_per_sm // threads, 32))


# --------------------------------------------------------------------------------------------- kernels

@triton.jit
def _write_kv_kernel(K, V, KC, VC, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:  # padded row of a CUDA-graph batch: nothing to write
        return
    block = slot // PAGE
    offset = slot % PAGE
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(K + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(KC + block * stride_kcb + h[:, None] * stride_kch + offset * stride_kct + d[None, :],
             k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + block * stride_vcb + h[:, None] * stride_vch + offset * stride_vct + d[None, :],
             v.to(VC.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows(table_row, n0, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N - 1 looked up in the block table: (key indices, physical block of each
    key as int64, offset of each key inside its block). MASKED: keys at or past `end` may exist (their
    table entries are not read)."""
    n = n0 + tl.arange(0, BLOCK_N)
    if PAGE % BLOCK_N == 0:
        # Tiles start at multiples of BLOCK_N, so the whole tile lies in one block: one table read.
        block = tl.load(table_row + n0 // PAGE).to(tl.int64) + tl.zeros([BLOCK_N], dtype=tl.int64)
    else:
        if MASKED:
            block = tl.load(table_row + n // PAGE, mask=n < end, other=0).to(tl.int64)
        else:
            block = tl.load(table_row + n // PAGE).to(tl.int64)
    return n, block, n % PAGE


@triton.jit
def _decode_kernel(Q, KC, VC, O, LSE, OP, LSEP,
                   positions, block_tables, context_lens, query_start_loc,
                   qk_scale,
                   stride_qt, stride_qh,
                   stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   stride_ot, stride_oh, stride_lt,
                   stride_bt,
                   stride_ps, stride_ph, stride_pk,
                   stride_lps, stride_lph,
                   num_splits,
                   G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_end = tl.load(query_start_loc + seq + 1)
    if q_end - q_start != 1:  # prefill chunks (and empty entries) belong to the prefill kernel
        return
    token = q_start.to(tl.int64)
    context = tl.load(context_lens + seq).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    limit = tl.maximum(tl.minimum(context, position + 1), 0)  # keys this token may see
    # This split's share, a whole number of tiles, computed here so the grid never depends on the data.
    chunk = tl.cdiv(tl.cdiv(limit, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, limit)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < HEAD_DIM
    heads = kv_head * G + g
    q = tl.load(Q + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    k_base = KC + kv_head * stride_kh
    v_base = VC + kv_head * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n, block, offset = _tile_rows(table_row, n0, end, PAGE, BLOCK_N, True)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt + d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(nmask[None, :], scores * qk_scale, float("-inf"))
        # Key n0 < end is always valid, so every row's maximum is finite here.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt + d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if DIRECT:  # a single split: this is the final result
        tl.store(O + token * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(LSE + token * stride_lt + heads, lse, mask=gmask)
    else:
        seq64 = seq.to(tl.int64)
        tl.store(OP + seq64 * stride_ps + heads[:, None] * stride_ph + split * stride_pk + d[None, :], out,
                 mask=gmask[:, None] & dmask[None, :])
        tl.store(LSEP + seq64 * stride_lps + heads * stride_lph + split, lse, mask=gmask)


@triton.jit
def _merge_kernel(O, LSE, OP, LSEP, query_start_loc,
                  stride_ot, stride_oh, stride_lt,
                  stride_ps, stride_ph, stride_pk,
                  stride_lps, stride_lph,
                  num_splits,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    q_start = tl.load(query_start_loc + seq)
    q_end = tl.load(query_start_loc + seq + 1)
    if q_end - q_start != 1:
        return
    token = q_start.to(tl.int64)
    seq64 = seq.to(tl.int64)
    k = tl.arange(0, SPLITS_PAD)
    kmask = k < num_splits
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    lse_row = LSEP + seq64 * stride_lps + head * stride_lph
    part_row = OP + seq64 * stride_ps + head * stride_ph
    lse = tl.load(lse_row + k, mask=kmask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a key: weights all 0, output 0
    total = tl.sum(tl.exp(lse - top), 0)
    # The partial outputs in chunks of CHUNK splits: a [SPLITS_PAD, D] tile would not fit in registers.
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, CHUNK):
        c = first + tl.arange(0, CHUNK)
        cmask = c < num_splits
        weight = tl.exp(tl.load(lse_row + c, mask=cmask, other=float("-inf")) - top)
        part = tl.load(part_row + c[:, None] * stride_pk + d[None, :], mask=cmask[:, None] & dmask[None, :],
                       other=0.0)
        acc += tl.sum(part * weight[:, None], 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(O + token * stride_ot + head * stride_oh + d, out.to(O.dtype.element_ty), mask=dmask)
    tl.store(LSE + token * stride_lt + head, tl.where(total > 0, top + tl.log(tl.where(total > 0, total, 1.0)),
                                                      float("-inf")))


@triton.jit
def _prefill_kernel(Q, KC, VC, O, LSE,
                    positions, block_tables, context_lens, query_start_loc,
                    qk_scale,
                    stride_qt, stride_qh,
                    stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt,
                    stride_ot, stride_oh, stride_lt,
                    stride_bt,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    # Causal tiles late in a chunk see the most keys: launch them first so the short ones fill the tail.
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if q_len < 2:  # single tokens go through the split-KV decode kernel
        return
    if tile * BLOCK_M >= q_len:
        return
    ROWS: tl.constexpr = BLOCK_M * G_PAD
    r = tl.arange(0, ROWS)
    local = tile * BLOCK_M + r // G_PAD  # token index inside the sequence's chunk
    g = r % G_PAD
    row_valid = (local < q_len) & (g < G)
    token = (q_start + local).to(tl.int64)
    heads = kv_head * G + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & dmask[None, :], other=0.0)
    context = tl.load(context_lens + seq).to(tl.int64)
    position = tl.load(positions + token, mask=row_valid, other=0).to(tl.int64)
    limit = tl.where(row_valid, tl.maximum(tl.minimum(position + 1, context), 0), 0)  # keys per row (causal)
    kv_end = tl.max(limit, 0)
    # Keys below every valid row's limit need no mask: process them first, the diagonal band after.
    kv_full = (tl.min(tl.where(row_valid, limit, kv_end), 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    k_base = KC + kv_head * stride_kh
    v_base = VC + kv_head * stride_vh

    for n0 in range(0, kv_full, BLOCK_N):
        n, block, offset = _tile_rows(table_row, n0, kv_full, PAGE, BLOCK_N, False)
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt + d[None, :])
            v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt + d[None, :])
        else:
            k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt + d[None, :],
                        mask=dmask[None, :], other=0.0)
            v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt + d[None, :],
                        mask=dmask[None, :], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            scores = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    for n0 in range(kv_full, kv_end, BLOCK_N):
        n, block, offset = _tile_rows(table_row, n0, kv_end, PAGE, BLOCK_N, True)
        in_context = n < kv_end
        kv_mask = in_context[:, None] & dmask[None, :]
        k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt + d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            scores = tl.dot(q, tl.trans(k)) * qk_scale
        scores = tl.where(n[None, :] < limit[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep it at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=row_valid[:, None] & dmask[None, :])
    tl.store(LSE + token * stride_lt + heads, lse, mask=row_valid)


# ------------------------------------------------------------------------------------------- wrappers

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's k/v [T, Hkv, D] into the caches [num_blocks, Hkv, block_size, D] at slot_mapping
    (block * block_size + offset); rows whose slot is negative are skipped."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [tokens, kv_heads, head_dim], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, kv_heads, block_size, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[1] != k_cache.shape[1] or k.shape[2] != k_cache.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} does not fit the cache's heads and head_dim {tuple(k_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous")
    check_same_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v, slot_mapping=slot_mapping)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _write_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_power_of_2(kv_heads),
        BLOCK_D=next_power_of_2(head_dim), PAGE=k_cache.shape[2],
        num_warps=max(1, min(8, kv_heads * head_dim // 256)))


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, kv_heads, block_size, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} differs from the cache's {k_cache.shape[3]}")
    check_head_dim(head_dim)
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous")
    num_seqs = meta.query_start_loc.shape[0] - 1
    if len(meta.query_lens_cpu) != num_seqs or len(meta.context_lens_cpu) != num_seqs:
        raise ValueError(f"meta.query_lens_cpu and meta.context_lens_cpu must list all {num_seqs} sequences "
                         f"(got {len(meta.query_lens_cpu)} and {len(meta.context_lens_cpu)})")
    if meta.positions.shape[0] != tokens:
        raise ValueError(f"meta.positions has {meta.positions.shape[0]} entries for {tokens} tokens")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, positions=meta.positions,
                      block_tables=meta.block_tables, context_lens=meta.context_lens,
                      query_start_loc=meta.query_start_loc)


def paged_attention_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, scale: float | None = None, *,
                             out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                             num_splits: int | None = None, config: DenseKernelConfig | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention of every step token over its sequence's paged cache (already written).

    Returns out [T, Hq, D] (q's dtype) and the natural-log log-sum-exp of each row's scaled scores
    lse [T, Hq] float32 (-inf, with output 0, where a row sees no key), so partial results over disjoint
    key sets merge exactly: out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i(lse_i).

    out / lse may be given (preallocated, e.g. static buffers of a CUDA graph). num_splits fixes the
    decode kernel's split count (default: decode_num_splits from the host lists).
    """
    _validate(q, k_cache, v_cache, meta)
    tokens, q_heads, head_dim = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    device = q.device
    cfg = config or default_config(head_dim, q.dtype)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dimension")
    if lse is None:
        lse = torch.empty(tokens, q_heads, dtype=torch.float32, device=device)
    elif lse.shape != (tokens, q_heads) or lse.dtype != torch.float32 or lse.stride(-1) != 1:
        raise ValueError(f"lse must be ({tokens}, {q_heads}) float32 with a contiguous last dimension")
    num_seqs = meta.query_start_loc.shape[0] - 1
    if tokens == 0 or num_seqs == 0:
        return out, lse

    q = _last_dim_contiguous(q)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    qk_scale = scale * _LOG2E  # softmax in base 2: exp2 is the fast instruction
    block_d = next_power_of_2(head_dim)
    ieee = q.dtype == torch.float32  # float32 callers want float32 accuracy, not tf32's 1e-3
    positions = meta.positions
    block_tables = meta.block_tables
    context_lens = meta.context_lens
    query_start_loc = meta.query_start_loc
    common_strides = (q.stride(0), q.stride(1),
                      k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                      v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                      out.stride(0), out.stride(1), lse.stride(0),
                      block_tables.stride(0))

    if any(n == 1 for n in meta.query_lens_cpu):
        g_pad = max(16, next_power_of_2(group))  # tl.dot wants at least 16 rows
        residency_key = (device, q.dtype, group, head_dim, page, cfg.decode_block_n, cfg.decode_warps,
                         cfg.decode_stages)
        if num_splits is None:
            num_splits = decode_num_splits(num_seqs, kv_heads, meta.max_context_len, device, cfg.decode_block_n,
                                           _DECODE_RESIDENCY.get(residency_key))
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if num_splits == 1:
            part_out, part_lse = out, lse  # unused: the kernel writes the final result directly
            part_strides = (0, 0, 0, 0, 0)
        else:
            part_out = torch.empty(num_seqs, q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
            part_lse = torch.empty(num_seqs, q_heads, num_splits, dtype=torch.float32, device=device)
            if POISON_WORKSPACE:
                part_out.fill_(float("nan"))
                part_lse.fill_(float("nan"))
            part_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2),
                            part_lse.stride(0), part_lse.stride(1))
        compiled = _decode_kernel[(num_seqs, kv_heads, num_splits)](
            q, k_cache, v_cache, out, lse, part_out, part_lse,
            positions, block_tables, context_lens, query_start_loc,
            qk_scale, *common_strides, *part_strides, num_splits,
            G=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=cfg.decode_block_n, PAGE=page,
            DIRECT=num_splits == 1, IEEE=ieee, num_warps=cfg.decode_warps, num_stages=cfg.decode_stages)
        if num_splits > 1 and residency_key not in _DECODE_RESIDENCY:
            resident = _resident_per_sm(compiled, device)
            if resident:
                _DECODE_RESIDENCY[residency_key] = resident
        if num_splits > 1:
            _merge_kernel[(num_seqs, q_heads)](
                out, lse, part_out, part_lse, query_start_loc,
                out.stride(0), out.stride(1), lse.stride(0), *part_strides, num_splits,
                HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PAD=next_power_of_2(num_splits),
                CHUNK=min(16, next_power_of_2(num_splits)), num_warps=4 if num_splits > 16 else 2)

    if meta.max_query_len > 1:
        g_pad = next_power_of_2(group)
        block_m = max(1, cfg.prefill_rows // g_pad)
        if block_m * g_pad < 16:
            block_m = cdiv(16, g_pad)
        _prefill_kernel[(num_seqs, kv_heads, cdiv(meta.max_query_len, block_m))](
            q, k_cache, v_cache, out, lse,
            positions, block_tables, context_lens, query_start_loc,
            qk_scale, *common_strides,
            G=group, G_PAD=g_pad, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_N=cfg.prefill_block_n, PAGE=page, IEEE=ieee,
            num_warps=cfg.prefill_warps, num_stages=cfg.prefill_stages)
    return out, lse


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float | None = None, *, out: torch.Tensor | None = None,
                    num_splits: int | None = None, config: DenseKernelConfig | None = None) -> torch.Tensor:
    """Dense attention of every step token over its sequence's paged cache (already written). [T, Hq, D].

    Same contract as kernels/reference/dense.py paged_attention; see paged_attention_with_lse.
    """
    return paged_attention_with_lse(q, k_cache, v_cache, meta, scale, out=out, num_splits=num_splits,
                                    config=config)[0]


__all__ = ["DenseKernelConfig", "decode_num_splits", "default_config", "paged_attention",
           "paged_attention_with_lse", "write_kv"]
