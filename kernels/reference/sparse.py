"""PyTorch reference for sparse range attention over the paged cache (docs/kernels.md, "Sparse range
attention"): every step token attends to a few [start, end) key ranges of its own sequence plus a local
window, with either one softmax over all of them ("union") or a gated mixture of per-range softmaxes.

The oracle for kernels/triton/sparse.py. Shapes:
  q             [T, Hq, D]
  ranges        [T, Hr, R, 2] int: [start, end) key positions (end <= start: empty). Query head h uses
                ranges[:, h // (Hq // Hr)]: Hr = Hq gives each query head its own ranges, Hr = Hkv one
                set per GQA group, Hr = 1 one set per token.
  window_start  [T] int or None: each token also attends keys [window_start, position] (None: no window).
                Ranges must not overlap the window.
  gate_logits   [T, Hr, R] float or None. None ("union"): one softmax over the union of the ranges and
                the window; the caller keeps the ranges disjoint so no key counts twice (the kernel
                merges per-range results). Given ("gated"; ranges may overlap each other):
                out = sum_r softmax(gate_logits)_r * attention(range_r + window) over the ranges with a
                finite logit; a token whose logits are all -inf gets the window alone.
Keys after a token's position are never attended (ranges are clipped to [0, position]).
"""

from __future__ import annotations

import torch

from ..base import AttentionMetadata
from .dense import gather_kv

_MAX_TILE_ELEMENTS = 1 << 24


def _softmax_rows(scores: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, hkv: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [Hq, M, N] masked by mask [Hq, M, N] -> (out [Hq, M, D], lse [Hq, M]); rows without keys
    give 0 and -inf."""
    hq, m, n = scores.shape
    s = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    out = torch.bmm(probs.reshape(hkv, (hq // hkv) * m, n), v).reshape(hq, m, -1)
    return out, lse


def range_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    ranges: torch.Tensor, *, window_start: torch.Tensor | None = None,
                    gate_logits: torch.Tensor | None = None, scale: float | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns out [T, Hq, D] (q's dtype) and, in union mode, lse [T, Hq] float32 (natural log; -inf where
    a token attends nothing), so results over disjoint key sets merge exactly. Gated mode returns None."""
    tokens, hq, d = q.shape
    hkv = k_cache.shape[1]
    hr, num_ranges = ranges.shape[1], ranges.shape[2]
    rep = hq // hr
    scale = d ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(tokens, hq, d, dtype=q.dtype, device=q.device)
    lse_out = torch.full((tokens, hq), float("-inf"), dtype=torch.float32, device=q.device)
    start = 0
    for i in range(meta.num_seqs):
        m = meta.query_lens_cpu[i]
        if m == 0:
            continue
        ctx = meta.context_lens_cpu[i]
        keys = gather_kv(k_cache, meta.block_tables[i], ctx).to(acc)
        values = gather_kv(v_cache, meta.block_tables[i], ctx).to(acc)
        key = torch.arange(ctx, device=q.device)
        tile = max(1, _MAX_TILE_ELEMENTS // max(1, hq * ctx * (num_ranges + 2)))
        for s in range(start, start + m, tile):
            e = min(start + m, s + tile)
            pos = meta.positions[s:e].to(torch.int64)
            causal = key[None, :] <= pos[:, None]  # [M, N]
            r = ranges[s:e].to(torch.int64).repeat_interleave(rep, dim=1)  # [M, Hq, R, 2]
            in_range = (key >= r[..., 0, None]) & (key < r[..., 1, None]) & causal[:, None, None, :]
            in_range = in_range.permute(1, 0, 2, 3)  # [Hq, M, R, N]
            if window_start is None:
                window = torch.zeros_like(causal)
            else:
                window = (key[None, :] >= window_start[s:e, None].to(torch.int64)) & causal
            qf = q[s:e].to(acc).transpose(0, 1).reshape(hkv, (hq // hkv) * (e - s), d)
            scores = torch.bmm(qf, keys.transpose(1, 2)).reshape(hq, e - s, ctx) * scale
            if gate_logits is None:
                o, lse = _softmax_rows(scores, window[None] | in_range.any(2), values, hkv)
                lse_out[s:e] = lse.transpose(0, 1).float()
            else:
                gates = gate_logits[s:e].to(acc).repeat_interleave(rep, dim=1).transpose(0, 1)  # [Hq, M, R]
                valid = torch.isfinite(gates)
                weights = torch.nan_to_num(torch.softmax(gates, dim=-1), nan=0.0)
                o_w, _ = _softmax_rows(scores, window[None].expand(hq, -1, -1), values, hkv)
                o = torch.zeros_like(o_w)
                for j in range(num_ranges):  # R is small: one masked softmax per range slot
                    o_j, _ = _softmax_rows(scores, window[None] | in_range[:, :, j], values, hkv)
                    o += weights[..., j, None] * o_j
                o = torch.where(valid.any(-1, keepdim=True), o, o_w)
            out[s:e] = o.transpose(0, 1).to(q.dtype)
        start += m
    return out, (lse_out if gate_logits is None else None)
