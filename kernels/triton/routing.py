"""Triton kernels for routing attention; references in kernels/reference/routing.py (same signatures).

* ``assign``: nearest centroid by cosine for a batch of keys (one program per (batch row, key block), the
  centroids walked in blocks, a running max and argmax; ties go to the lowest index like torch.argmax).
* ``update_centroids``: per-cluster sums of the raw and of the unit keys as one-hot matrix products (no
  atomics: deterministic, and every output is written), then the EMA / Lloyd step and normalisation.
* ``attend``: attention of each query tile over its selection: sinks, routed member positions and the local
  region, walked as one virtual list of positions through the block table. One program per (tile, KV head,
  row block, split); the rows are (token, head of the GQA group) pairs, so the group's K/V are read once per
  tile. Online softmax; each split writes a normalised partial output and its log-sum-exp, merged exactly.

Values are upcast to float32 right after loading (bfloat16 is wrong in Triton's CPU interpreter); dots run in
exact float32 for float32 inputs and in TF32 otherwise (exact for 16-bit inputs, which have <= 10 mantissa
bits; only the probabilities are rounded, as a 16-bit cast would).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import cdiv, check_same_device, next_power_of_2, num_sms

# Tests set this to fill the split workspace with NaN first, proving the merge reads only written results.
POISON_WORKSPACE = False

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_MIN_SPLIT_KEYS = 256


# ---------------------------------------------------------------- k-means

@triton.jit
def _assign_kernel(K, C, OUT, N, NUM_C, stride_kb, stride_kn, stride_cb, stride_cc, stride_ob,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    nmask = n < N
    dmask = d < D
    keys = tl.load(K + b * stride_kb + n[:, None] * stride_kn + d[None, :], mask=nmask[:, None] & dmask[None, :],
                   other=0.0).to(tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, NUM_C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cent = tl.load(C + b * stride_cb + c[:, None] * stride_cc + d[None, :], mask=(c[:, None] < NUM_C) & dmask[None, :],
                       other=0.0).to(tl.float32)
        s = tl.dot(keys, tl.trans(cent), input_precision=PRECISION)  # [BLOCK_N, BLOCK_C]
        s = tl.where(c[None, :] < NUM_C, s, float("-inf"))
        top = tl.max(s, axis=1)
        at = tl.argmax(s, axis=1).to(tl.int32) + c0
        better = top > best  # strict: an equal score in a later block keeps the lower index
        best = tl.where(better, top, best)
        arg = tl.where(better, at, arg)
    tl.store(OUT + b * stride_ob + n, arg, mask=nmask)


@triton.jit
def _update_kernel(K, A, C, NEW, RAW, CNT, N, NUM_C, log2_decay,
                   stride_kb, stride_kn, stride_ab, stride_cb, stride_cc, stride_nb, stride_nc,
                   stride_rb, stride_rc, stride_xb,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    cmask = c < NUM_C
    dmask = d < D
    raw = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    unit = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < N
        keys = tl.load(K + b * stride_kb + n[:, None] * stride_kn + d[None, :],
                       mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        a = tl.load(A + b * stride_ab + n, mask=nmask, other=-1)
        onehot = (a[None, :] == c[:, None]).to(tl.float32)  # [BLOCK_C, BLOCK_N]
        norm = tl.sqrt(tl.sum(keys * keys, axis=1))
        units = keys / tl.maximum(norm, 1e-12)[:, None]
        raw += tl.dot(onehot, keys, input_precision="ieee")
        unit += tl.dot(onehot, units, input_precision="ieee")
        count += tl.sum(onehot, axis=1)
    cmask2 = cmask[:, None] & dmask[None, :]
    old = tl.load(C + b * stride_cb + c[:, None] * stride_cc + d[None, :], mask=cmask2, other=0.0).to(tl.float32)
    keep = tl.where(count > 0, tl.exp2(count * log2_decay), 1.0)  # decay^n
    mean_unit = unit / tl.maximum(count, 1.0)[:, None]
    moved = keep[:, None] * old + (1.0 - keep[:, None]) * mean_unit
    moved = moved / tl.maximum(tl.sqrt(tl.sum(moved * moved, axis=1)), 1e-12)[:, None]
    new = tl.where(count[:, None] > 0, moved, old)
    tl.store(NEW + b * stride_nb + c[:, None] * stride_nc + d[None, :], new, mask=cmask2)
    tl.store(RAW + b * stride_rb + c[:, None] * stride_rc + d[None, :], raw, mask=cmask2)
    tl.store(CNT + b * stride_xb + c, count.to(tl.int32), mask=cmask)


def _check_batch(keys: torch.Tensor, centroids: torch.Tensor) -> None:
    if keys.dim() != 3 or centroids.dim() != 3 or keys.shape[0] != centroids.shape[0] \
            or keys.shape[2] != centroids.shape[2]:
        raise ValueError(f"keys [B, N, D] and centroids [B, C, D] expected, got {tuple(keys.shape)} and "
                         f"{tuple(centroids.shape)}")


def assign(keys: torch.Tensor, centroids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest centroid by cosine (centroids are unit vectors). keys [B, N, D], centroids [B, C, D] -> int32 [B, N]."""
    _check_batch(keys, centroids)
    check_same_device(keys=keys, centroids=centroids)
    keys, centroids = keys.contiguous(), centroids.contiguous()
    b, n, d = keys.shape
    if out is None:
        out = torch.empty(b, n, dtype=torch.int32, device=keys.device)
    if b == 0 or n == 0:
        return out
    block_d = max(16, next_power_of_2(d))
    block_n = 32 if block_d > 128 else 64
    precision = "ieee" if keys.dtype == torch.float32 or centroids.dtype == torch.float32 else "tf32"
    _assign_kernel[(b, cdiv(n, block_n))](
        keys, centroids, out, n, centroids.shape[1], keys.stride(0), keys.stride(1), centroids.stride(0),
        centroids.stride(1), out.stride(0), D=d, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_C=32,
        PRECISION=precision)
    return out


def update_centroids(keys: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor, decay: float,
                     out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cluster key sums and the EMA centroid update (see the reference). Returns (new centroids float32
    [B, C, D], raw key sums float32 [B, C, D], counts int32 [B, C])."""
    _check_batch(keys, centroids)
    check_same_device(keys=keys, assignment=assignment, centroids=centroids)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    keys, assignment, centroids = keys.contiguous(), assignment.contiguous(), centroids.contiguous()
    b, n, d = keys.shape
    c = centroids.shape[1]
    dev = keys.device
    if out is None:
        out = (torch.empty(b, c, d, dtype=torch.float32, device=dev), torch.empty(b, c, d, dtype=torch.float32, device=dev),
               torch.empty(b, c, dtype=torch.int32, device=dev))
    new, raw, cnt = out
    if b == 0 or c == 0:
        return new, raw, cnt
    block_d = max(16, next_power_of_2(d))
    block_c = 32 if block_d > 128 else 64
    log2_decay = math.log2(decay) if decay > 0 else -1e30  # decay^n = exp2(n * log2_decay); 0^n = 0 for n > 0
    _update_kernel[(b, cdiv(c, block_c))](
        keys, assignment, centroids, new, raw, cnt, n, c, log2_decay,
        keys.stride(0), keys.stride(1), assignment.stride(0), centroids.stride(0), centroids.stride(1),
        new.stride(0), new.stride(1), raw.stride(0), raw.stride(1), cnt.stride(0),
        D=d, BLOCK_D=block_d, BLOCK_N=32, BLOCK_C=block_c)
    return new, raw, cnt


# ---------------------------------------------------------------- routed attention

@triton.jit
def _attend_kernel(Q, KC, VC, OP, LSEP, block_tables, tile_info, routed, routed_count,
                   scale_log2, num_splits,
                   stride_qt, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_bt,
                   stride_rt, stride_rh,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    th = tl.program_id(0)
    t = th // KV_HEADS
    h = th % KV_HEADS
    split = tl.program_id(2)
    info = tile_info + t * 8
    seq = tl.load(info + 0).to(tl.int64)
    q_start = tl.load(info + 1)
    q_len = tl.load(info + 2)
    first_pos = tl.load(info + 3)
    last_pos = tl.load(info + 4)
    n_sink = tl.load(info + 5)
    local_lo = tl.load(info + 6)
    n_routed = tl.load(routed_count + t * KV_HEADS + h)
    n_local = last_pos - local_lo + 1
    total = n_sink + n_routed + n_local

    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows: (token m, group head g) pairs
    m = r // GROUP
    head = h * GROUP + r % GROUP
    rmask = m < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    token = (q_start + m).to(tl.int64)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    qpos = first_pos + m

    per_split = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, total)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    routed_row = routed + t * stride_rt + h * stride_rh
    table_row = block_tables + seq * stride_bt
    for v0 in range(lo, hi, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)  # index into [sinks | routed | local]
        valid = v < hi
        in_routed = (v >= n_sink) & (v < n_sink + n_routed)
        rpos = tl.load(routed_row + (v - n_sink), mask=valid & in_routed, other=0)
        pos = tl.where(v < n_sink, v, tl.where(in_routed, rpos, local_lo + v - n_sink - n_routed))
        pos = tl.where(valid, pos, 0)
        block = tl.load(table_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        kvmask = valid[:, None] & dmask[None, :]
        k = tl.load(KC + block[:, None] * stride_kb + h * stride_kh + off[:, None] * stride_kt + d[None, :],
                    mask=kvmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_R, BLOCK_N], log2 units
        ok = valid[None, :] & (pos[None, :] <= qpos[:, None]) & rmask[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vals = tl.load(VC + block[:, None] * stride_vb + h * stride_vh + off[:, None] * stride_vt + d[None, :],
                       mask=kvmask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vals, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(OP + split * stride_ps + token[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :], out,
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSEP + split * stride_ls + token * stride_lt + head, lse, mask=rmask)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           selection, scale: float | None = None, return_lse: bool = False, num_splits: int | None = None,
           out: torch.Tensor | None = None):
    """Attention of every step token over its tile's selection (a reference.routing.RoutingSelection).
    q [T, Hq, D] -> [T, Hq, D] in q's dtype (and the log-sum-exp [T, Hq] float32 with return_lse)."""
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables)
    ntok, hq, d = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not split into {hkv} KV heads")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q and the caches need a contiguous last dimension")
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    tiles = selection.tiles
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(ntok, hq, dtype=torch.float32, device=q.device)
    if not tiles:
        return (out, lse) if return_lse else out
    routed = selection.routed.contiguous()
    counts = selection.routed_count.contiguous()
    width = routed.shape[2]
    max_rows = max(t.q_len for t in tiles) * group
    block_r = max(16, min(64, next_power_of_2(max_rows)))
    row_blocks = cdiv(max_rows, block_r)
    longest = max(t.sink_end + width + t.last_pos - t.local_lo + 1 for t in tiles)
    programs = len(tiles) * hkv * row_blocks
    if num_splits is None:
        num_splits = max(1, min(_MAX_SPLITS, cdiv(longest, _MIN_SPLIT_KEYS), cdiv(4 * num_sms(q.device), programs)))
    fill = float("nan") if POISON_WORKSPACE else 0.0
    part = torch.full((num_splits, ntok, hq, d), fill, dtype=torch.float32, device=q.device)
    part_lse = torch.full((num_splits, ntok, hq), fill, dtype=torch.float32, device=q.device)
    block_d = max(16, next_power_of_2(d))
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    tables = block_tables
    _attend_kernel[(len(tiles) * hkv, row_blocks, num_splits)](
        q, k_cache, v_cache, part, part_lse, tables, selection.tile_info, routed, counts,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), part_lse.stride(0), part_lse.stride(1), tables.stride(0),
        routed.stride(0), routed.stride(1),
        KV_HEADS=hkv, GROUP=group, D=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=32 if block_d > 128 else 64,
        PAGE=page, PRECISION=precision)
    if num_splits == 1:
        out.copy_(part[0])
        lse.copy_(part_lse[0])
    else:
        lse.copy_(torch.logsumexp(part_lse, dim=0))
        weight = torch.exp(part_lse - lse.clamp_min(-1e30))  # an empty split (lse -inf) weighs 0
        out.copy_((weight.unsqueeze(-1) * part).sum(0))
    return (out, lse) if return_lse else out
