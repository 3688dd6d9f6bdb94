"""Triton kernels for sparse range attention over the paged cache (docs/kernels.md, "Sparse range attention").

Same contract as kernels/reference/sparse.py range_attention: every step token attends a few [start, end)
key ranges of its own sequence (per query head, per GQA group or per token) plus a local window, merged
into one softmax ("union") or mixed by softmax gates ("gated"). Superlinear spans, HyLRA's top-k blocks and
routing's cluster members are all such ranges.

Two kernels:
* ``_range_split_kernel``: one program per (token, query head, segment, chunk), where a segment is one
  range or the window and a chunk is at most CHUNK of its keys (split-K, so a single decoded token still
  fills the GPU). It walks its keys through the block table with an online softmax and writes a normalised
  partial output plus its log-sum-exp.
* ``_range_combine_kernel``: one program per (token, query head): merges the chunks of every segment by
  their log-sum-exps, then the segments (union) or each range with the window, mixed by the gates (gated).

No host synchronisation: the grid depends only on host integers (tokens, heads, segments, the chunk count
from the caller's bounds on range and window lengths); each program reads its own range from the device.
A CUDA graph captured with given bounds replays correctly for any ranges within them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import AttentionMetadata
from .common import cdiv, check_same_device, interpreting, next_power_of_2, num_sms

# Tests set this to fill the partial-result workspace with NaN first (proves the combine reads only what
# the split kernel wrote).
POISON_WORKSPACE = False

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_BLOCK_N = 64
_MIN_CHUNK = 256
_MAX_CHUNKS = 32
_PROGRAMS_PER_SM = 4
_TILED_MIN_TOKENS = 64  # steps with a prefill chunk of this many tokens take the tiled path


@triton.jit
def _range_split_kernel(Q, KC, VC, OP, LP, positions, token_seq, block_tables, ranges, window_start,
                        qk_scale,
                        s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt,
                        s_rt, s_rh, s_rr,
                        s_pt, s_ph, s_ps, s_pc, s_lt, s_lh, s_ls,
                        G: tl.constexpr, RANGE_GROUP: tl.constexpr, NUM_RANGES: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, NUM_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seg = tl.program_id(2) // NUM_CHUNKS
    chunk = tl.program_id(2) % NUM_CHUNKS
    position = tl.load(positions + token).to(tl.int64)
    seq = tl.load(token_seq + token).to(tl.int64)
    if seg < NUM_RANGES:
        rbase = ranges + token * s_rt + (head // RANGE_GROUP) * s_rh + seg * s_rr
        start = tl.load(rbase).to(tl.int64)
        end = tl.load(rbase + 1).to(tl.int64)
    else:
        start = tl.load(window_start + token).to(tl.int64)
        end = position + 1
    start = tl.maximum(start, 0)
    end = tl.minimum(end, position + 1)  # never a key after the token
    c0 = start + chunk * CHUNK
    c1 = tl.minimum(end, c0 + CHUNK)

    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kv_head = (head // G).to(tl.int64)
    q = tl.load(Q + token * s_qt + head * s_qh + d, mask=dmask, other=0.0).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    table = block_tables + seq * s_bt
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < c1
        block = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
        offset = n % PAGE
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(KC + block[:, None] * s_kb + kv_head * s_kh + offset[:, None] * s_kt + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], 1) * qk_scale
        scores = tl.where(nmask, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))  # n0 < c1: at least one real key in the tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        v = tl.load(VC + block[:, None] * s_vb + kv_head * s_vh + offset[:, None] * s_vt + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(OP + token * s_pt + head * s_ph + seg * s_ps + chunk * s_pc + d, out, mask=dmask)
    tl.store(LP + token * s_lt + head * s_lh + seg * s_ls + chunk, lse)


@triton.jit
def _range_combine_kernel(OP, LP, GATES, O, LSE,
                          s_pt, s_ph, s_ps, s_pc, s_lt, s_lh, s_ls,
                          s_gt, s_gh, s_ot, s_oh, s_et,
                          RANGE_GROUP: tl.constexpr, NUM_RANGES: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          GATED: tl.constexpr, NUM_CHUNKS: tl.constexpr, SEG_PAD: tl.constexpr,
                          CHUNK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    NUM_SEGS: tl.constexpr = NUM_RANGES + HAS_WINDOW
    s = tl.arange(0, SEG_PAD)
    c = tl.arange(0, CHUNK_PAD)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    sc_mask = (s[:, None] < NUM_SEGS) & (c[None, :] < NUM_CHUNKS)
    lse = tl.load(LP + token * s_lt + head * s_lh + s[:, None] * s_ls + c[None, :], mask=sc_mask,
                  other=float("-inf"))  # [S, C]
    part = tl.load(OP + token * s_pt + head * s_ph + s[:, None, None] * s_ps + c[None, :, None] * s_pc
                   + d[None, None, :], mask=sc_mask[:, :, None] & dmask[None, None, :], other=0.0)  # [S, C, D]
    # Each segment: merge its chunks (weights relative to the segment's own maximum).
    seg_max = tl.max(lse, 1)  # [S]
    seg_ref = tl.where(seg_max == float("-inf"), 0.0, seg_max)
    w = tl.exp(lse - seg_ref[:, None])  # [S, C]; 0 for empty chunks
    seg_sum = tl.sum(w, 1)
    seg_has = seg_sum > 0
    seg_out = tl.sum(part * w[:, :, None], 1) / tl.where(seg_has, seg_sum, 1.0)[:, None]  # [S, D]
    seg_lse = tl.where(seg_has, seg_ref + tl.log(tl.where(seg_has, seg_sum, 1.0)), float("-inf"))  # [S]
    if GATED:
        is_range = s < NUM_RANGES
        logits = tl.load(GATES + token * s_gt + (head // RANGE_GROUP) * s_gh + s, mask=is_range,
                         other=float("-inf"))
        gate_max = tl.max(logits, 0)
        any_gate = gate_max > float("-inf")
        gate = tl.exp(logits - tl.where(any_gate, gate_max, 0.0))
        gate = gate / tl.where(any_gate, tl.sum(gate, 0), 1.0)  # softmax over finite logits; all 0 if none
        if HAS_WINDOW:
            win_sel = (s == NUM_RANGES)
            win_lse = tl.max(tl.where(win_sel, seg_lse, float("-inf")), 0)
            win_out = tl.sum(tl.where(win_sel[:, None], seg_out, 0.0), 0)  # [D]
        else:
            win_lse = -float("inf")
            win_out = tl.zeros([BLOCK_D], dtype=tl.float32)
        # range r with the window: weights exp(lse_r - m) and exp(lse_w - m), m their maximum
        m = tl.maximum(seg_lse, win_lse)
        m = tl.where(m == float("-inf"), 0.0, m)
        wr = tl.exp(seg_lse - m)
        ww = tl.exp(win_lse - m)
        tot = wr + ww
        mixed = (seg_out * wr[:, None] + win_out[None, :] * ww[:, None]) / tl.where(tot > 0, tot, 1.0)[:, None]
        out = tl.sum(mixed * gate[:, None], 0)
        out = tl.where(any_gate, out, win_out)
    else:
        top = tl.max(seg_lse, 0)
        ref = tl.where(top == float("-inf"), 0.0, top)
        ws = tl.exp(seg_lse - ref)
        total = tl.sum(ws, 0)
        out = tl.sum(seg_out * ws[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(LSE + token * s_et + head, tl.where(total > 0, ref + tl.log(tl.where(total > 0, total, 1.0)),
                                                     float("-inf")))
    tl.store(O + token * s_ot + head * s_oh + d, out.to(O.dtype.element_ty), mask=dmask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32: exact float32 products when IEEE (float32 data, or the CPU
    interpreter), else tensor cores on the second operand's 16-bit type."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _online_step(q, k, v, keep, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """One key tile of an online softmax (base 2) for rows q [M, D] over k/v [N, D], keep [M, N]."""
    scores = _dot(q, tl.trans(k), IEEE) * qk_scale
    scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _range_tile_kernel(Q, KC, VC, OP, LP, positions, token_seq, block_tables, ranges, order, num_pairs,
                       qk_scale,
                       s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt, s_rt, s_rh, s_rr, s_o,
                       s_pt, s_ph, s_ps, s_lt, s_lh, s_ls,
                       G: tl.constexpr, RANGE_GROUP: tl.constexpr, NUM_RANGES: tl.constexpr, BM: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       IEEE: tl.constexpr):
    """Prefill: one program per BM (token, head, range) pairs of one KV head, taken in the order of their
    range starts (`order`), so the pairs of a tile share most of their keys: the tile walks the union of
    its ranges once with tensor-core dots, each row masked to its own range."""
    kv_head = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    in_p = rows < num_pairs
    pair = tl.load(order + kv_head * s_o + rows, mask=in_p, other=0).to(tl.int64)
    token = pair // (G * NUM_RANGES)
    head = kv_head * G + (pair // NUM_RANGES) % G
    r = pair % NUM_RANGES
    rb = ranges + token * s_rt + (head // RANGE_GROUP) * s_rh + r * s_rr
    position = tl.load(positions + token, mask=in_p, other=0).to(tl.int64)
    start = tl.maximum(tl.load(rb, mask=in_p, other=0).to(tl.int64), 0)
    end = tl.minimum(tl.load(rb + 1, mask=in_p, other=0).to(tl.int64), position + 1)
    valid = in_p & (start < end)
    seq = tl.load(token_seq + token, mask=in_p, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + token[:, None] * s_qt + head[:, None] * s_qh + d[None, :], mask=in_p[:, None] & dmask[None, :],
                other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    big = 1 << 62
    # Pairs are sorted by (sequence, start): a tile holds one or a few sequences, each a run of rows.
    seq_lo = tl.min(tl.where(valid, seq, big), 0)
    seq_hi = tl.max(tl.where(valid, seq, -1), 0)
    for sq in range(seq_lo, seq_hi + 1):
        in_seq = valid & (seq == sq)
        lo = tl.min(tl.where(in_seq, start, big), 0)
        hi = tl.max(tl.where(in_seq, end, 0), 0)
        table = block_tables + sq * s_bt
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            # skip key tiles that fall in a gap between this tile's ranges
            if tl.max(tl.where(in_seq & (start < n0 + BLOCK_N) & (end > n0), 1, 0), 0) > 0:
                n = n0 + tl.arange(0, BLOCK_N)
                nmask = n < hi
                blk = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
                off = n % PAGE
                kvm = nmask[:, None] & dmask[None, :]
                k = tl.load(KC + blk[:, None] * s_kb + kv_head * s_kh + off[:, None] * s_kt + d[None, :], mask=kvm,
                            other=0.0)
                v = tl.load(VC + blk[:, None] * s_vb + kv_head * s_vh + off[:, None] * s_vt + d[None, :], mask=kvm,
                            other=0.0)
                keep = in_seq[:, None] & (n[None, :] >= start[:, None]) & (n[None, :] < end[:, None])
                m_i, l_i, acc = _online_step(q, k, v, keep, m_i, l_i, acc, qk_scale, IEEE)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(OP + token[:, None] * s_pt + head[:, None] * s_ph + r[:, None] * s_ps + d[None, :], out,
             mask=in_p[:, None] & dmask[None, :])
    tl.store(LP + token * s_lt + head * s_lh + r * s_ls, lse, mask=in_p)


@triton.jit
def _window_tile_kernel(Q, KC, VC, OP, LP, positions, query_start_loc, block_tables, window_start, qk_scale,
                        s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt,
                        s_pt, s_ph, s_ps, s_lt, s_lh, s_ls,
                        G: tl.constexpr, G_PAD: tl.constexpr, SEG: tl.constexpr, BLOCK_M: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                        IEEE: tl.constexpr):
    """Prefill: the local window of BLOCK_M consecutive tokens of one sequence for a whole GQA group (rows =
    (token, head) pairs), a sliding band of keys read once per tile."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        ROWS: tl.constexpr = BLOCK_M * G_PAD
        rr = tl.arange(0, ROWS)
        local = tile * BLOCK_M + rr // G_PAD
        g = rr % G_PAD
        row_valid = (local < q_len) & (g < G)
        token = (q_start + tl.minimum(local, q_len - 1)).to(tl.int64)
        head = kv_head * G + tl.minimum(g, G - 1)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(Q + token[:, None] * s_qt + head[:, None] * s_qh + d[None, :],
                    mask=row_valid[:, None] & dmask[None, :], other=0.0)
        position = tl.load(positions + token).to(tl.int64)
        ws = tl.maximum(tl.load(window_start + token).to(tl.int64), 0)
        lo = tl.min(tl.where(row_valid, ws, 1 << 62), 0)
        hi = tl.max(tl.where(row_valid, position + 1, 0), 0)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        table = block_tables + seq * s_bt
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < hi
            blk = tl.load(table + n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = n % PAGE
            kvm = nmask[:, None] & dmask[None, :]
            k = tl.load(KC + blk[:, None] * s_kb + kv_head * s_kh + off[:, None] * s_kt + d[None, :], mask=kvm,
                        other=0.0)
            v = tl.load(VC + blk[:, None] * s_vb + kv_head * s_vh + off[:, None] * s_vt + d[None, :], mask=kvm,
                        other=0.0)
            keep = row_valid[:, None] & (n[None, :] >= ws[:, None]) & (n[None, :] <= position[:, None])
            m_i, l_i, acc = _online_step(q, k, v, keep, m_i, l_i, acc, qk_scale, IEEE)
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(OP + token[:, None] * s_pt + head[:, None] * s_ph + SEG * s_ps + d[None, :], out,
                 mask=row_valid[:, None] & dmask[None, :])
        tl.store(LP + token * s_lt + head * s_lh + SEG * s_ls, lse, mask=row_valid)


def token_sequences(meta: AttentionMetadata) -> torch.Tensor:
    """[T] int32: the metadata's sequence index of every step token, computed on the device without a sync."""
    qsl = meta.query_start_loc
    lens = (qsl[1:] - qsl[:-1]).to(torch.int64)
    seqs = torch.arange(lens.shape[0], device=qsl.device, dtype=torch.int32)
    return torch.repeat_interleave(seqs, lens, output_size=meta.num_tokens)


def choose_chunks(tokens: int, heads: int, segments: int, max_len: int, device: torch.device,
                  block_n: int = _BLOCK_N) -> tuple[int, int]:
    """(chunk, num_chunks): keys per split program and splits per segment, enough programs to fill the
    device, never chunks below _MIN_CHUNK keys (nor more than _MAX_CHUNKS)."""
    max_len = max(1, int(max_len))
    wanted = cdiv(_PROGRAMS_PER_SM * num_sms(device), max(1, tokens * heads * segments))
    n = max(1, min(wanted, cdiv(max_len, _MIN_CHUNK), _MAX_CHUNKS))
    chunk = cdiv(cdiv(max_len, n), block_n) * block_n
    n = cdiv(max_len, chunk)
    if n > _MAX_CHUNKS:  # very long ranges with few programs: longer chunks
        chunk = cdiv(cdiv(max_len, _MAX_CHUNKS), block_n) * block_n
        n = cdiv(max_len, chunk)
    return chunk, n


def _pair_order(ranges: torch.Tensor, positions: torch.Tensor, token_seq: torch.Tensor, hq: int, hkv: int
                ) -> torch.Tensor:
    """[Hkv, T * G * R] int32: each KV head's (token, head of the group, range) pairs ordered by
    (sequence, range start), empty ranges last. Pair p = (token * G + g) * R + r."""
    tokens, hr, num_ranges = ranges.shape[0], ranges.shape[1], ranges.shape[2]
    r = ranges.to(torch.int64).repeat_interleave(hq // hr, dim=1)  # [T, Hq, R, 2]
    start = r[..., 0].clamp_min(0)
    end = torch.minimum(r[..., 1], positions.to(torch.int64)[:, None, None] + 1)
    key = (token_seq.to(torch.int64)[:, None, None] << 40) + start
    key = torch.where(start < end, key, torch.full_like(key, 1 << 62))
    key = key.view(tokens, hkv, hq // hkv, num_ranges).permute(1, 0, 2, 3).reshape(hkv, -1)
    return torch.sort(key, dim=1, stable=True).indices.to(torch.int32)


def range_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    ranges: torch.Tensor, *, window_start: torch.Tensor | None = None,
                    gate_logits: torch.Tensor | None = None, scale: float | None = None,
                    max_range_len: int, max_window_len: int = 0, token_seq: torch.Tensor | None = None,
                    chunk: int | None = None, path: str = "auto", out: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse range attention (see kernels/reference/sparse.py for the contract).

    max_range_len / max_window_len: host bounds on end - start of any range and on the window's length
    (position - window_start + 1); the split path visits no keys beyond them, so they must hold. token_seq:
    [T] sequence index per token (computed from meta if None). path: "split" (split-K per token: decode),
    "tiled" (tiles of range-sorted pairs and of consecutive tokens' windows, tensor-core dots: prefill) or
    "auto" (tiled when a sequence has a chunk of at least _TILED_MIN_TOKENS tokens; decode batches of
    any size stay split). chunk: keys per split program.
    Returns out [T, Hq, D] and, in union mode, lse [T, Hq] float32 (else None)."""
    tokens, hq, head_dim = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    if ranges.dim() != 4 or ranges.shape[0] != tokens or ranges.shape[3] != 2 or hq % ranges.shape[1]:
        raise ValueError(f"ranges must be [T, Hr, R, 2] with Hr dividing {hq}, got {tuple(ranges.shape)}")
    hr, num_ranges = ranges.shape[1], ranges.shape[2]
    if gate_logits is not None and gate_logits.shape != (tokens, hr, num_ranges):
        raise ValueError(f"gate_logits must be {(tokens, hr, num_ranges)}, got {tuple(gate_logits.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, ranges=ranges, positions=meta.positions)
    device = q.device
    if out is None:
        out = torch.empty_like(q)
    lse = torch.full((tokens, hq), float("-inf"), dtype=torch.float32, device=device)
    if tokens == 0:
        return out, (lse if gate_logits is None else None)
    if path not in ("auto", "split", "tiled"):
        raise ValueError(f"path must be 'auto', 'split' or 'tiled', got {path!r}")
    tiled = path == "tiled" or (path == "auto" and meta.max_query_len >= _TILED_MIN_TOKENS)
    has_window = window_start is not None
    segments = num_ranges + int(has_window)
    max_len = max(int(max_range_len), int(max_window_len) if has_window else 0, 1)
    if tiled:
        chunk, num_chunks = max_len, 1
    elif chunk is None:
        chunk, num_chunks = choose_chunks(tokens, hq, segments, max_len, device)
    else:
        num_chunks = cdiv(max_len, chunk)
    if token_seq is None:
        token_seq = token_sequences(meta)
    ranges = ranges.to(torch.int32).contiguous()
    if window_start is None:
        window_start = torch.zeros(1, dtype=torch.int32, device=device)  # never read
    part = torch.empty(tokens, hq, segments, num_chunks, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(tokens, hq, segments, num_chunks, dtype=torch.float32, device=device)
    if POISON_WORKSPACE:
        part.fill_(float("nan"))
        part_lse.fill_(float("nan"))
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale = head_dim ** -0.5 if scale is None else float(scale)
    block_d = next_power_of_2(head_dim)
    bt = meta.block_tables
    if tiled:
        _tiled_partials(q, k_cache, v_cache, meta, ranges, window_start if has_window else None, token_seq,
                        part, part_lse, scale * _LOG2E)
    else:
        _range_split_kernel[(tokens, hq, segments * num_chunks)](
            q, k_cache, v_cache, part, part_lse, meta.positions, token_seq, bt, ranges, window_start,
            scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0),
            ranges.stride(0), ranges.stride(1), ranges.stride(2),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            G=hq // hkv, RANGE_GROUP=hq // hr, NUM_RANGES=num_ranges, HAS_WINDOW=int(has_window),
            NUM_CHUNKS=num_chunks, CHUNK=chunk, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=_BLOCK_N, PAGE=page,
            num_warps=4)
    gates = gate_logits.float().contiguous() if gate_logits is not None else part_lse  # dummy when union
    _range_combine_kernel[(tokens, hq)](
        part, part_lse, gates, out, lse,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        gates.stride(0), gates.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        RANGE_GROUP=hq // hr, NUM_RANGES=num_ranges, HAS_WINDOW=int(has_window), GATED=gate_logits is not None,
        NUM_CHUNKS=num_chunks, SEG_PAD=next_power_of_2(segments), CHUNK_PAD=next_power_of_2(num_chunks),
        HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=4)
    return out, (lse if gate_logits is None else None)


def _tiled_partials(q, k_cache, v_cache, meta, ranges, window_start, token_seq, part, part_lse, qk_scale):
    """Prefill path: per-range partials from the range tiles, the window's from the window tiles
    (one chunk per segment)."""
    tokens, hq, head_dim = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    num_ranges = ranges.shape[2]
    ieee = q.dtype == torch.float32 or interpreting()
    block_d = max(16, next_power_of_2(head_dim))
    block_n = 16 if ieee else 64  # exact float32 dots run on the CUDA cores: small tiles
    bt = meta.block_tables
    common = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
              v_cache.stride(2), bt.stride(0))
    part_strides = (part.stride(0), part.stride(1), part.stride(2), part_lse.stride(0), part_lse.stride(1),
                    part_lse.stride(2))
    if num_ranges:
        order = _pair_order(ranges, meta.positions, token_seq, hq, hkv)
        pairs = order.shape[1]
        bm = 16 if ieee else 64
        _range_tile_kernel[(hkv, cdiv(pairs, bm))](
            q, k_cache, v_cache, part, part_lse, meta.positions, token_seq, bt, ranges, order, pairs, qk_scale,
            q.stride(0), q.stride(1), *common, ranges.stride(0), ranges.stride(1), ranges.stride(2),
            order.stride(0), *part_strides,
            G=group, RANGE_GROUP=hq // ranges.shape[1], NUM_RANGES=num_ranges, BM=bm, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page, IEEE=ieee, num_warps=4)
    if window_start is not None:
        g_pad = next_power_of_2(group)
        rows = 16 if ieee else 128
        block_m = max(1, rows // g_pad, cdiv(16, g_pad))
        _window_tile_kernel[(meta.num_seqs, hkv, cdiv(max(meta.max_query_len, 1), block_m))](
            q, k_cache, v_cache, part, part_lse, meta.positions, meta.query_start_loc, bt, window_start, qk_scale,
            q.stride(0), q.stride(1), *common, *part_strides,
            G=group, G_PAD=g_pad, SEG=num_ranges, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_N=block_n, PAGE=page, IEEE=ieee, num_warps=4 if ieee else 8)
