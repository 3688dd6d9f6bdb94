"""HyLRA: the offline DP against brute force, the runtime backend against dense and itself."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from longserve.kernels.plan import AttentionPlan
from longserve.policies import dp


# ---------------------------------------------------------------- offline DP

@pytest.mark.parametrize("seed", range(300))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    values = np.array([[rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) if seed % 3 == 0 else rng.random()
                        for _ in range(n)] for _ in range(n)])
    full = {i for i in range(n) if rng.random() < 0.3}
    cap = rng.choice([None, 1, 2, 3, rng.randint(1, n)])
    res = dp.solve(values, full, cap)
    want = dp.brute_force(values, full, cap)
    got = dp.objective(values, res.layers)
    assert got[0] == want[0]
    assert math.isclose(got[1], want[1], rel_tol=1e-12, abs_tol=1e-12)
    assert (res.min_overlap, res.sum_overlap) == got
    plan = res.to_plan()  # validates: reuse only from an earlier compute layer
    non_full = [i for i in range(n) if i not in full]
    assert [i for i, lp in enumerate(plan.layers) if lp.mode == "full"] == sorted(full)
    if non_full:
        assert plan.layers[non_full[0]].mode == "compute"
    assert res.num_compute == sum(lp.mode == "compute" for lp in plan.layers)
    if cap is not None:
        assert res.num_compute <= cap
    for i, lp in enumerate(plan.layers):
        if lp.mode == "reuse":  # the source is the most recent compute layer (segments)
            between = [j for j in range(lp.source + 1, i) if plan.layers[j].mode == "compute"]
            assert not between


def test_dp_prefers_high_overlap_segments():
    # Layers 0..3: 1 serves 0 badly, 2 and 3 are served well by 1. With two compute layers: 0 and 1 compute.
    o = np.eye(4)
    o[1, 0] = 0.1
    o[2, 0], o[2, 1] = 0.2, 0.9
    o[3, 0], o[3, 1], o[3, 2] = 0.2, 0.8, 0.95
    res = dp.solve(o, full_layers=[], max_compute=2)
    assert [lp.mode for lp in res.layers] == ["compute", "compute", "reuse", "reuse"]
    assert [lp.source for lp in res.layers] == [None, None, 1, 1]
    assert res.min_overlap == 0.8


def test_dp_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        dp.solve(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dp.solve(np.full((2, 2), 1.5))
    with pytest.raises(ValueError, match="outside"):
        dp.solve(np.eye(2), full_layers=[5])
    with pytest.raises(ValueError, match="positive"):
        dp.solve(np.eye(2), max_compute=0)
