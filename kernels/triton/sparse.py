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
from .common import cdiv, check_same_device, next_power_of_2, num_sms

# Tests set this to fill the partial-result workspace with NaN first (proves the combine reads only what
# the split kernel wrote).
POISON_WORKSPACE = False

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_BLOCK_N = 64
_MIN_CHUNK = 256
_MAX_CHUNKS = 32
_PROGRAMS_PER_SM = 4


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


def range_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    ranges: torch.Tensor, *, window_start: torch.Tensor | None = None,
                    gate_logits: torch.Tensor | None = None, scale: float | None = None,
                    max_range_len: int, max_window_len: int = 0, token_seq: torch.Tensor | None = None,
                    chunk: int | None = None, out: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse range attention (see kernels/reference/sparse.py for the contract).

    max_range_len / max_window_len: host bounds on end - start of any range and on the window's length
    (position - window_start + 1); keys beyond them are not visited, so they must hold. token_seq: [T]
    sequence index per token (computed from meta if None). chunk: keys per split program (default: from
    the device size). Returns out [T, Hq, D] and, in union mode, lse [T, Hq] float32 (else None)."""
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
    has_window = window_start is not None
    segments = num_ranges + int(has_window)
    max_len = max(int(max_range_len), int(max_window_len) if has_window else 0, 1)
    if chunk is None:
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
