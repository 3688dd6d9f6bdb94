"""HyLRA's offline dynamic program: which non-full layers COMPUTE their own top-k and which REUSE one.

Inputs
  overlap[i][j]  how well layer j's top-k selection serves layer i (mean |TopK_i & TopK_j| / |TopK_j|, in [0, 1])
  full_layers    layers that run dense attention (chosen beforehand from their sensitivity)
  max_compute    cap on the number of COMPUTE layers (None: no cap)

The non-full layers, in order, are cut into segments: a COMPUTE layer followed by REUSE layers that take
that COMPUTE layer's selection. The first non-full layer therefore always computes.

Objective (maximized lexicographically): (the minimum contribution, then the sum of contributions) over the
non-full layers, where a REUSE layer i with source j contributes overlap[i][j] and a COMPUTE layer contributes
1 (its selection serves itself perfectly). Counting COMPUTE layers as 1 makes the sum the total "selection
quality" of the model, so the DP never prefers reuse when a compute layer is free; the cap is the speed knob.

Why two passes and not one: the pair (min, sum) has no optimal substructure (a prefix with a higher min but a
lower sum can lose once a later layer lowers the min anyway). So pass 1 finds the best achievable minimum m*
(max-min is decomposable), and pass 2 maximizes the sum among assignments whose every contribution is >= m*.
Both passes run over the states (segment head, compute layers used) in O(n^2 * cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from longserve.kernels.plan import AttentionPlan, LayerPlan


@dataclass
class DPResult:
    layers: list[LayerPlan]  # one per model layer: full / compute / reuse(source)
    min_overlap: float  # the minimum contribution over non-full layers (1.0 when there are none or all compute)
    sum_overlap: float  # the sum of contributions over non-full layers
    num_compute: int

    def to_plan(self, method: str = "hylra", params: dict[str, Any] | None = None,
                model: dict[str, Any] | None = None, profile: dict[str, Any] | None = None) -> AttentionPlan:
        plan = AttentionPlan(method, list(self.layers), dict(params or {}), dict(model or {}), dict(profile or {}))
        plan.validate()
        return plan


def objective(overlap: np.ndarray, layers: Sequence[LayerPlan]) -> tuple[float, float]:
    """(min, sum) of contributions of an assignment, accumulated left to right (as the DP does)."""
    lo, total = 1.0, 0.0
    for i, lp in enumerate(layers):
        if lp.mode == "full":
            continue
        c = 1.0 if lp.mode == "compute" else float(overlap[i][lp.source])
        lo = min(lo, c)
        total += c
    return lo, total


def _check_inputs(overlap: Any, full_layers: Iterable[int], max_compute: int | None) -> tuple[np.ndarray, set[int]]:
    o = np.asarray(overlap, dtype=np.float64)
    if o.ndim != 2 or o.shape[0] != o.shape[1] or o.shape[0] == 0:
        raise ValueError(f"overlap must be a non-empty square matrix, got shape {o.shape}")
    if not np.all(np.isfinite(o)) or o.min() < 0 or o.max() > 1:
        raise ValueError("overlap values must be finite and within [0, 1]")
    n = o.shape[0]
    full = set(int(i) for i in full_layers)
    bad = [i for i in full if not 0 <= i < n]
    if bad:
        raise ValueError(f"full layer indices {sorted(bad)} are outside 0..{n - 1}")
    if max_compute is not None and (not isinstance(max_compute, int) or max_compute < 1) and len(full) < n:
        raise ValueError(f"max_compute_layers must be a positive integer, got {max_compute!r}")
    return o, full


def solve(overlap: Any, full_layers: Iterable[int] = (), max_compute: int | None = None) -> DPResult:
    """The optimal FULL/COMPUTE/REUSE assignment (see the module docstring for the objective)."""
    o, full = _check_inputs(overlap, full_layers, max_compute)
    n = o.shape[0]
    layers_idx = [i for i in range(n) if i not in full]  # non-full layers in order
    m = len(layers_idx)
    if m == 0:
        return DPResult([LayerPlan("full") for _ in range(n)], 1.0, 0.0, 0)
    cap = m if max_compute is None else min(max_compute, m)
    # gain[t, h]: contribution of non-full layer t reusing non-full layer h (h < t).
    sub = o[np.ix_(layers_idx, layers_idx)]

    best_min = _max_min(sub, m, cap)
    heads = _max_sum(sub, m, cap, threshold=best_min)

    out = [LayerPlan("full") for _ in range(n)]
    for t, h in enumerate(heads):
        out[layers_idx[t]] = LayerPlan("compute") if h == t else LayerPlan("reuse", layers_idx[h])
    lo, total = objective(o, out)
    return DPResult(out, lo, total, sum(1 for t, h in enumerate(heads) if h == t))


def _max_min(sub: np.ndarray, m: int, cap: int) -> float:
    """Pass 1: the best achievable minimum contribution. value[h, c] = best min of the prefix ending in a
    segment headed by h with c compute layers used (-inf: unreachable)."""
    value = np.full((m, cap + 1), -np.inf)
    value[0, 1] = 1.0
    for t in range(1, m):
        new = np.full_like(value, -np.inf)
        # REUSE: stay in the segment of head h (< t), contribution sub[t, h].
        new[:t] = np.minimum(value[:t], sub[t, :t, None])
        # COMPUTE: t becomes the head; any previous head with c-1 computes.
        new[t, 1:] = np.minimum(value[:t, :-1].max(axis=0), 1.0)
        value = new
    return float(value.max())


def _max_sum(sub: np.ndarray, m: int, cap: int, threshold: float) -> list[int]:
    """Pass 2: maximize the sum with every REUSE contribution >= threshold. Returns each non-full layer's
    segment head (its own index for COMPUTE layers)."""
    allowed = sub >= threshold
    value = np.full((m, cap + 1), -np.inf)
    value[0, 1] = 1.0
    prev_head = []  # prev_head[t][c]: the head before t when t computes with c compute layers used
    for t in range(1, m):
        new = np.full_like(value, -np.inf)
        gain = np.where(allowed[t, :t], sub[t, :t], -np.inf)
        new[:t] = value[:t] + gain[:, None]
        arg = value[:t, :-1].argmax(axis=0)  # [cap]
        new[t, 1:] = value[arg, np.arange(cap)] + 1.0
        prev_head.append(np.concatenate([[0], arg]))
        value = new
    h, c = np.unravel_index(int(np.argmax(value)), value.shape)
    if not np.isfinite(value[h, c]):
        raise AssertionError("DP found no feasible assignment (pass 1 promised one)")
    heads = [0] * m
    for t in range(m - 1, 0, -1):
        heads[t] = int(h)
        if h == t:
            h, c = prev_head[t - 1][c], c - 1
    heads[0] = 0
    return heads


def brute_force(overlap: Any, full_layers: Iterable[int] = (), max_compute: int | None = None) -> tuple[float, float]:
    """Best (min, sum) by enumerating every assignment (for tests; exponential)."""
    o, full = _check_inputs(overlap, full_layers, max_compute)
    n = o.shape[0]
    layers_idx = [i for i in range(n) if i not in full]
    m = len(layers_idx)
    if m == 0:
        return 1.0, 0.0
    cap = m if max_compute is None else max_compute
    best = None
    for mask in range(1 << (m - 1)):  # bit t-1 set: non-full layer t computes (layer 0 always computes)
        flags = [True] + [bool(mask >> (t - 1) & 1) for t in range(1, m)]
        if sum(flags) > cap:
            continue
        layers = [LayerPlan("full") for _ in range(n)]
        head = None
        for t, comp in enumerate(flags):
            if comp:
                head = layers_idx[t]
                layers[head] = LayerPlan("compute")
            else:
                layers[layers_idx[t]] = LayerPlan("reuse", head)
        score = objective(o, layers)
        if best is None or score > best:
            best = score
    return best
