"""Superlinear span attention: the reference against a brute force built from the published formulas, its
properties (dense below the window, structural non-exclusion, needles), the paged backend, the Triton
kernels (interpreter on CPU)."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

if not torch.cuda.is_available():  # must be set before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from longserve.kernels.base import AttentionMetadata, BackendError, LayerCache, StepState  # noqa: E402
from longserve.kernels.plan import AttentionPlan  # noqa: E402
from longserve.kernels.reference import dense as dense_ref  # noqa: E402
from longserve.kernels.reference import superlinear as ref  # noqa: E402
from longserve.kernels.superlinear import SuperlinearBackend, span_attention  # noqa: E402

# ------------------------------------------------------------------ brute force, straight from the formulas


def _int_root_floor(x: int, n: int) -> int:
    r = int(round(x ** (1.0 / n)))
    while r ** n > x:
        r -= 1
    while (r + 1) ** n <= x:
        r += 1
    return r


def _pow_floor(x: int, p: float) -> int:
    """floor(x^p), exact when p = 1/n."""
    n = round(1 / p)
    if abs(1 / p - n) < 1e-9:
        return _int_root_floor(x, n)
    return math.floor(x ** p)


def _inv_pow_floor(s: int, p: float) -> int:
    """floor(s^(1/p)), exact when p = 1/n."""
    n = round(1 / p)
    if abs(1 / p - n) < 1e-9:
        return s ** n
    return math.floor(s ** (1 / p))


def _pow_ceil_times(x: int, p: float, factor: float) -> int:
    """ceil(factor * x^p), with the exact root when x is a perfect power."""
    n = round(1 / p)
    root = x ** p
    if abs(1 / p - n) < 1e-9 and _int_root_floor(x, n) ** n == x:
        root = _int_root_floor(x, n)
    return math.ceil(factor * root)


def _softmax_attend(qv, keys, values, idx, scale):
    """Softmax attention of one query vector over the key positions in idx (a set)."""
    idx = torch.tensor(sorted(idx))
    w = torch.softmax(keys[idx] @ qv * scale, 0)
    return w @ values[idx]


def brute_force(q, k, v, positions, *, q_search=None, sw_index, num_spans, backward_factor, forward_factor,
                search_power, span_power, combine, search, block_size=64, sink_tokens=0, summary_score="bound",
                span_align="anchor"):
    """Loop over batch, query head and query; everything computed from the issue's formulas in float64."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qs_all = q if q_search is None else q_search
    q, k, v, qs_all = q.double(), k.double(), v.double(), qs_all.double()
    p, ps = search_power, span_power
    window = _inv_pow_floor(sw_index + 1, p) - 1
    scale = 1 / math.sqrt(d)
    out = torch.zeros(bsz, hq, lq, d, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            kh = h // group
            keys, values = k[b, kh], v[b, kh]
            if search == "summary":
                nb = (lk + block_size - 1) // block_size
                kmin = [keys[i * block_size:(i + 1) * block_size].min(0).values for i in range(nb)]
                kmax = [keys[i * block_size:(i + 1) * block_size].max(0).values for i in range(nb)]
                kmean = [keys[i * block_size:(i + 1) * block_size].mean(0) for i in range(nb)]
            for i in range(lq):
                qpos = int(positions[i])
                t = qpos + 1
                qv, qsv = q[b, h, i], qs_all[b, h, i]
                sw_start = max(0, qpos - window + 1)
                window_keys = set(range(sw_start, qpos + 1))
                if search == "summary":  # the Quest bound of every block, for this query
                    bound = [float(torch.maximum(qsv * kmin[blk], qsv * kmax[blk]).sum()) for blk in range(nb)]
                    if summary_score == "mean":  # q . mean key of the block
                        bound = [float(qsv @ kmean[blk]) for blk in range(nb)]
                cands = []  # (score, stripe, start, end)
                centred = {}  # span_align "block": best block -> the span centred on it (first stripe wins)
                back, fwd = _pow_ceil_times(t, ps, backward_factor), _pow_ceil_times(t, ps, forward_factor)
                s = sw_index  # the published rule: stripe s is valid while floor(s^(1/p)) <= t
                while _inv_pow_floor(s + 1, p) <= t:
                    s += 1
                    a = qpos - _inv_pow_floor(s, p) + 1
                    start = max(0, a - back)
                    end = min(a + fwd, qpos, sw_start - 1)
                    if search == "anchor":
                        score = float(qsv @ keys[a])
                    else:
                        touched = list(range(start // block_size, end // block_size + 1))
                        score = max(bound[blk] for blk in touched)
                        best = next(blk for blk in touched if bound[blk] == score)  # the leftmost
                        if span_align == "block":
                            last = min(qpos, sw_start - 1)
                            c_start = max(0, min(best * block_size + block_size // 2 - (back + fwd) // 2,
                                                 last - back - fwd))
                            if best not in centred:
                                centred[best] = (score, s, c_start, min(c_start + back + fwd, last))
                            continue
                    cands.append((score, s, start, end))
                cands += centred.values()
                if not cands:
                    out[b, h, i] = _softmax_attend(qv, keys, values, range(qpos + 1), scale)
                    continue
                chosen = sorted(cands, key=lambda c: (-c[0], c[1]))[:num_spans]  # ties: nearer anchor
                if combine == "union":
                    keyset = set(window_keys) | set(range(min(sink_tokens, sw_start)))
                    for _, _, start, end in chosen:
                        keyset |= set(range(start, end + 1))
                    out[b, h, i] = _softmax_attend(qv, keys, values, keyset, scale)
                else:
                    gates = torch.softmax(torch.tensor([c[0] for c in chosen], dtype=torch.float64), 0)
                    for g, (_, _, start, end) in zip(gates, chosen):
                        keyset = window_keys | set(range(start, end + 1))
                        out[b, h, i] += g * _softmax_attend(qv, keys, values, keyset, scale)
    return out


PARAM_SETS = [
    dict(sw_index=3, num_spans=3, backward_factor=2.0, forward_factor=1.0, search_power=0.5, span_power=0.5),
    dict(sw_index=2, num_spans=2, backward_factor=3.0, forward_factor=0.5, search_power=0.55, span_power=0.55),
    dict(sw_index=4, num_spans=5, backward_factor=1.5, forward_factor=0.0, search_power=0.5, span_power=0.6),
    dict(sw_index=0, num_spans=1, backward_factor=2.0, forward_factor=1.0, search_power=0.5, span_power=0.5),
    dict(sw_index=1, num_spans=4, backward_factor=3.0, forward_factor=1.0, search_power=1 / 3, span_power=0.7),
]


def _inputs(seed, bsz, hq, hkv, lk, lq, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, lq, d, generator=g, dtype=dtype)
    k = torch.randn(bsz, hkv, lk, d, generator=g, dtype=dtype)
    v = torch.randn(bsz, hkv, lk, d, generator=g, dtype=dtype)
    positions = torch.randperm(lk, generator=g)[:lq]
    positions[0] = lk - 1
    return q, k, v, positions


@pytest.mark.parametrize("pi", range(len(PARAM_SETS)))
@pytest.mark.parametrize("combine", ["gate", "union"])
@pytest.mark.parametrize("search", ["anchor", "summary"])
def test_reference_matches_brute_force(pi, combine, search):
    params = PARAM_SETS[pi]
    heads = [(4, 2), (3, 3), (6, 2), (2, 1), (4, 4)][pi]
    q, k, v, positions = _inputs(100 + pi, 2, heads[0], heads[1], 333, 24, 8)
    kw = dict(params, combine=combine, search=search, block_size=8)
    got = span_attention(q, k, v, positions, impl="torch", **kw)
    want = brute_force(q, k, v, positions, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pi", range(3))
@pytest.mark.parametrize("search", ["anchor", "summary"])
def test_sinks_join_the_union(pi, search):
    """sink_tokens: keys [0, sink_tokens) are attended by every query whose window does not reach them."""
    params = PARAM_SETS[pi]
    q, k, v, positions = _inputs(200 + pi, 1, 4, 2, 333, 24, 8)
    kw = dict(params, combine="union", search=search, block_size=8)
    got = ref.span_attention(q, k, v, positions, ref.SpanParams(**{n: kw[n] for n in kw if n != "block_size"},
                                                                sink_tokens=9), block_size=8)
    torch.testing.assert_close(got, brute_force(q, k, v, positions, sink_tokens=9, **kw), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, brute_force(q, k, v, positions, **kw))


@pytest.mark.parametrize("pi", range(len(PARAM_SETS)))
@pytest.mark.parametrize("combine", ["gate", "union"])
def test_mean_score_matches_brute_force(pi, combine):
    """score "mean": a span's summary score is the largest q . (mean key) over the blocks it touches."""
    params = PARAM_SETS[pi]
    heads = [(4, 2), (3, 3), (6, 2), (2, 1), (4, 4)][pi]
    q, k, v, positions = _inputs(300 + pi, 1, heads[0], heads[1], 333, 24, 8)
    kw = dict(params, combine=combine, search="summary")
    got = ref.span_attention(q, k, v, positions, ref.SpanParams(**kw, score="mean"), block_size=8)
    torch.testing.assert_close(got, brute_force(q, k, v, positions, block_size=8, summary_score="mean", **kw),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pi", range(len(PARAM_SETS)))
@pytest.mark.parametrize("combine", ["gate", "union"])
@pytest.mark.parametrize("score", ["bound", "mean"])
def test_block_aligned_spans_match_brute_force(pi, combine, score):
    """span_align "block": one span per best block (the first stripe's), of the stripes' length, centred on
    that block and moved inside [0, min(q, window start - 1)]; sinks (union) join as before."""
    params = PARAM_SETS[pi]
    heads = [(4, 2), (3, 3), (6, 2), (2, 1), (4, 4)][pi]
    q, k, v, positions = _inputs(400 + pi, 1, heads[0], heads[1], 333, 24, 8)
    sinks = 5 if combine == "union" else 0
    kw = dict(params, combine=combine, search="summary")
    got = ref.span_attention(q, k, v, positions, ref.SpanParams(**kw, score=score, span_align="block",
                                                                sink_tokens=sinks), block_size=8)
    want = brute_force(q, k, v, positions, block_size=8, summary_score=score, span_align="block",
                       sink_tokens=sinks, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    published = brute_force(q, k, v, positions, block_size=8, summary_score=score, sink_tokens=sinks, **kw)
    assert not torch.allclose(got, published)


def test_block_aligned_span_covers_its_best_block():
    """The published tie rule takes the stripe nearest the query among the spans that touch the best block,
    which may touch it with its first key only and miss the key that made the block best; a block-aligned
    span holds the block whole in its middle."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 600, 8, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
    k[0, 225] = 40 * q[0, 0]  # block 28 (keys 224-231) of 8 keys holds a key far above the others
    params = ref.SpanParams(sw_index=3, num_spans=1, search="summary", score="mean")
    published, _ = ref.select_spans(q, k, torch.tensor([599]), params, block_size=8)
    # stripe 18: anchor 600 - 18^2 = 276, span [276 - ceil(2 sqrt(600)), 276 + ceil(sqrt(600))] = [227, 301]
    assert (int(published.stripes[0, 0, 0]), int(published.starts[0, 0, 0])) == (18, 227)
    aligned, _ = ref.select_spans(q, k, torch.tensor([599]), dataclasses.replace(params, span_align="block"),
                                  block_size=8)
    reach = math.ceil(2 * math.sqrt(600)) + math.ceil(math.sqrt(600))
    assert (int(aligned.starts[0, 0, 0]), int(aligned.ends[0, 0, 0])) == (228 - reach // 2, 228 - reach // 2 + reach)
    assert aligned.scores[0, 0, 0] == published.scores[0, 0, 0]


def test_block_alignment_needs_summary_search():
    with pytest.raises(BackendError, match="span_align"):
        ref.SpanParams(search="anchor", span_align="block")
    with pytest.raises(BackendError, match="span_align"):
        ref.SpanParams(search="summary", span_align="middle")


def test_sinks_need_union():
    with pytest.raises(BackendError, match="sink_tokens needs combine 'union'"):
        ref.SpanParams(sink_tokens=4, combine="gate")


def test_reference_uses_q_search_for_the_search_only():
    q, k, v, positions = _inputs(7, 1, 4, 2, 400, 20, 8)
    q_search = torch.randn_like(q)
    kw = dict(PARAM_SETS[0], combine="gate", search="anchor")
    got = span_attention(q, k, v, positions, q_search=q_search, impl="torch", **kw)
    torch.testing.assert_close(got, brute_force(q, k, v, positions, q_search=q_search, **kw), rtol=1e-9, atol=1e-9)
    # ... and it matters: the search query changes which spans are chosen.
    assert not torch.allclose(got, span_attention(q, k, v, positions, impl="torch", **kw))


@pytest.mark.parametrize("combine,search", [("gate", "anchor"), ("union", "summary")])
def test_shorter_than_window_is_dense_causal(combine, search):
    q, k, v, _ = _inputs(3, 2, 4, 2, 600, 600, 16, dtype=torch.float32)
    positions = torch.arange(600)
    got = span_attention(q, k, v, positions, combine=combine, search=search, impl="torch")  # window 4095
    for b in range(2):
        want = dense_ref.causal_attention(q[b].transpose(0, 1), k[b], v[b], positions).transpose(0, 1)
        torch.testing.assert_close(got[b], want, rtol=0, atol=2e-6)


def test_first_query_with_a_stripe_leaves_dense():
    """At q = W the first stripe appears (anchor 0) and key 0 leaves the window: no longer dense."""
    params = ref.SpanParams(sw_index=3)  # W = 15
    assert params.window == 15
    assert ref.num_valid_stripes(15, params) == 0 and ref.num_valid_stripes(16, params) == 1
    q, k, v, _ = _inputs(5, 1, 2, 2, 64, 1, 8)
    positions = torch.tensor([15])
    got = span_attention(q, k, v, positions, sw_index=3, impl="torch")
    dense = dense_ref.causal_attention(q[0].transpose(0, 1), k[0], v[0], positions).transpose(0, 1)
    # anchor 0's span is [0, 0]: gate over one span = attention over window + key 0 = dense. Shift to q=40:
    assert torch.allclose(got[0], dense)
    positions = torch.tensor([40])
    got = span_attention(q, k, v, positions, sw_index=3, num_spans=1, impl="torch")
    dense = dense_ref.causal_attention(q[0].transpose(0, 1), k[0], v[0], positions).transpose(0, 1)
    assert not torch.allclose(got[0], dense)


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("triton", torch.float32),
                                        ("triton", torch.float16)])
@pytest.mark.parametrize("search", ["anchor", "summary"])
def test_stripe_valid_while_floor_power_reaches_t(impl, dtype, search):
    """p = 0.55, q = 77: floor(11^(1/0.55)) = 78 <= q + 1, so stripe 11 (anchor 0) is searched although
    11 > 78^0.55. A needle at key 0 is then found (span [0, 0] of stripe 11)."""
    params = ref.SpanParams(sw_index=3, search_power=0.55, span_power=0.55, backward_factor=0.0,
                            forward_factor=0.0)  # W = 11, spans of one key (their anchor)
    assert ref.stripe_offset(11, 0.55) == 78 and 11 > 78 ** 0.55
    assert ref.num_valid_stripes(78, params) == 8  # stripes 4 .. 11
    assert ref.num_valid_stripes(77, params) == 7
    g = torch.Generator().manual_seed(3)
    d = 16
    q = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 80, d, generator=g, dtype=torch.float64) * 0.1
    v = torch.zeros(1, 1, 80, d, dtype=torch.float64)
    k[0, 0, 0] = q[0, 0, 0] * 8.0 / q[0, 0, 0].norm()  # q . k = 8 |q|: far above every other key's score
    v[0, 0, 0] = 1.0
    kw = dict(sw_index=3, num_spans=1, backward_factor=0.0, forward_factor=0.0, search_power=0.55,
              span_power=0.55, combine="union", search=search, block_size=4 if search == "summary" else 64)
    out = span_attention(q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor([77]), impl=impl, **kw)
    assert float(out[0, 0, 0].float().mean()) > 0.5  # the needle's value dominates


# ------------------------------------------------------------------------------ structural non-exclusion

def test_structural_non_exclusion_defaults():
    params = ref.SpanParams()
    assert params.window == 4095 and params.structurally_complete
    g = torch.Generator().manual_seed(0)
    probes = list(range(4090, 4200)) + [8191, 8192, 16383, 65535, 65536, 10 ** 6, 10 ** 7 - 1]
    probes += torch.randint(4096, 2 * 10 ** 6, (60,), generator=g).tolist()
    for pos in probes:
        assert ref.uncovered_keys(pos, params) == [], pos


@pytest.mark.parametrize("kw", [dict(search_power=0.55, span_power=0.55, backward_factor=2.0, sw_index=65),
                                dict(search_power=0.55, span_power=0.55, backward_factor=3.0, sw_index=65),
                                dict(search_power=1 / 3, span_power=2 / 3, backward_factor=3.0, sw_index=15)])
def test_structural_non_exclusion_other_complete_settings(kw):
    params = ref.SpanParams(**kw)
    assert params.structurally_complete
    for pos in list(range(params.window, params.window + 300)) + [10 ** 5, 777_777, 3 * 10 ** 6]:
        assert ref.uncovered_keys(pos, params) == [], pos


def test_non_exclusion_fails_when_spans_are_too_short():
    params = ref.SpanParams(backward_factor=0.5, forward_factor=0.5)
    assert not params.structurally_complete
    gaps = ref.uncovered_keys(10 ** 6, params)
    assert gaps and all(first <= last for first, last in gaps)


# -------------------------------------------------------------------------------------------- needles

NEEDLE_LK = 65536


def _needle_batch(needles, seed=11, d=16, hq=2):
    """One sequence per needle position: random keys (N(0, 1)), one key planted along head 0's query with
    q . k = 80 (attention logit 20: the needle takes nearly all the weight once it is attended)."""
    g = torch.Generator().manual_seed(seed)
    b = len(needles)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, 1, NEEDLE_LK, d, generator=g)
    v = torch.randn(b, 1, NEEDLE_LK, d, generator=g)
    for i, pos in enumerate(needles):
        k[i, 0, pos] = q[i, 0, 0] * (80.0 / q[i, 0, 0].dot(q[i, 0, 0]))
    return q, k, v, torch.tensor([NEEDLE_LK - 1])


def _selected(q, k, positions, params, block_size=64):
    """[B] bool: needle batch element i has its needle inside one of head 0's selected spans."""
    sel = [ref.select_spans(q[i], k[i], positions, params, block_size=block_size)[0] for i in range(q.shape[0])]
    return sel


def _covers(sel, pos):
    return bool((sel.valid[0, 0] & (sel.starts[0, 0] <= pos) & (sel.ends[0, 0] >= pos)).any())


@pytest.mark.parametrize("combine", ["union", "gate"])
def test_summary_search_finds_a_needle_anywhere(combine):
    window_start = NEEDLE_LK - 4095
    g = torch.Generator().manual_seed(1)
    needles = [0, 1, 63, 64, 1000, 30001, 40000 + 7, window_start - 1, window_start - 64]
    needles += torch.randint(0, window_start, (3,), generator=g).tolist()
    q, k, v, positions = _needle_batch(needles)
    params = ref.SpanParams(search="summary", combine=combine)
    out = span_attention(q, k, v, positions, search="summary", combine=combine, impl="torch")
    sel = _selected(q, k, positions, params)
    for i, pos in enumerate(needles):
        assert _covers(sel[i], pos), f"needle at {pos} not selected"
        if combine == "union":
            torch.testing.assert_close(out[i, 0, 0], v[i, 0, pos], rtol=0, atol=0.02)
        else:
            # Neighbouring spans that merely touch the needle's block tie with the one holding it, so the
            # gate can dilute the needle (docs/superlinear.md): its share is the gate weight of the spans
            # that contain it, at least 1 / num_spans.
            s = sel[i]
            holds = s.valid[0, 0] & (s.starts[0, 0] <= pos) & (s.ends[0, 0] >= pos)
            share = float(torch.softmax(s.scores[0, 0], 0)[holds].sum())
            assert share >= 1 / params.num_spans - 1e-6
            # The rest averages thousands of random values (about 0): the needle's coefficient is its share.
            coef = float(out[i, 0, 0] @ v[i, 0, pos] / (v[i, 0, pos] @ v[i, 0, pos]))
            assert abs(coef - share) < 0.1, (pos, coef, share)


def test_anchor_search_finds_needles_on_anchors_only():
    """The published search scores a span by its anchor's key alone: a needle ON an anchor is found, one
    between anchors only when a span chosen for other reasons happens to cover it (documented in
    docs/superlinear.md)."""
    t = NEEDLE_LK
    on_anchor = [t - s * s for s in (64, 65, 100, 181, 255, 256)]  # a_s = q - s^2 + 1 with q = t - 1
    between = [t - s * s - s for s in (70, 120, 160, 200, 230, 250)]  # midway between anchors s and s + 1
    q, k, v, positions = _needle_batch(on_anchor + between)
    params = ref.SpanParams(search="anchor", combine="union")
    out = span_attention(q, k, v, positions, search="anchor", combine="union", impl="torch")
    sel = _selected(q, k, positions, params)
    for i, pos in enumerate(on_anchor):
        assert _covers(sel[i], pos)
        torch.testing.assert_close(out[i, 0, 0], v[i, 0, pos], rtol=0, atol=0.02)
    found_between = sum(_covers(sel[len(on_anchor) + i], pos) for i, pos in enumerate(between))
    assert found_between <= 2  # by chance only (about 3 in 100 per needle at this length)
    # ... while summary search finds all of them.
    sel = _selected(q, k, positions, ref.SpanParams(search="summary", combine="union"))
    assert all(_covers(sel[i], pos) for i, pos in enumerate(on_anchor + between))


# ------------------------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kw,msg", [
    (dict(search_power=0.0), "search_power"), (dict(search_power=1.0), "search_power"),
    (dict(span_power=1.5), "span_power"), (dict(span_power=-0.1), "span_power"),
    (dict(num_spans=0), "num_spans"), (dict(backward_factor=-1.0), "backward_factor"),
    (dict(forward_factor=-0.5), "forward_factor"), (dict(combine="mean"), "combine"),
    (dict(search="pooled"), "search"), (dict(sw_index=-1), "sw_index"), (dict(num_spans=2.5), "num_spans"),
    (dict(search_power=float("nan")), "search_power"),
])
def test_bad_parameters_are_clear_errors(kw, msg):
    q, k, v, positions = _inputs(0, 1, 2, 1, 32, 4, 8)
    with pytest.raises(BackendError, match=msg):
        span_attention(q, k, v, positions, impl="torch", **kw)
    with pytest.raises(BackendError, match=msg):
        SuperlinearBackend(AttentionPlan.uniform("superlinear", 2, kw))


def test_backend_rejects_unknown_parameters_and_impl():
    with pytest.raises(BackendError, match="unknown parameter 'topk'"):
        SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"topk": 3}))
    with pytest.raises(BackendError, match="impl"):
        SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"impl": "cuda"}))
    b = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"num_spans": 2, "impl": "torch"}))
    assert (b.params.num_spans, b.params.search, b.params.combine, b.impl) == (2, "summary", "union", "torch")
    assert (b.params.score, b.params.sink_tokens, b.params.span_align, b.prefill) == ("mean", 16, "block", "dense")
    assert set(b.aux_specs(2, 8)) == {"kmean"}
    bound = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"score": "bound"}))
    assert set(bound.aux_specs(2, 8)) == {"kmin", "kmax"}
    gate = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"combine": "gate"}))
    assert (gate.params.sink_tokens, gate.params.span_align) == (0, "block")  # sinks join the union only
    anchor = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"search": "anchor"}))
    assert (anchor.aux_specs(2, 8), anchor.params.span_align) == ({}, "anchor")  # anchor search scores no blocks
    with pytest.raises(BackendError, match="span_align"):
        SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"search": "anchor", "span_align": "block"}))


def test_bad_shapes_are_clear_errors():
    q, k, v, positions = _inputs(0, 1, 3, 2, 32, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        span_attention(q, k, v, positions, impl="torch")
    q, k, v, positions = _inputs(0, 1, 2, 1, 32, 4, 8)
    with pytest.raises(ValueError, match="positions"):
        span_attention(q, k, v, positions + 100, impl="torch")


# ------------------------------------------------------------------------------------------ paged backend

class PagedScenario:
    """Sequences of different lengths in one paged cache with random block tables, run through a backend
    step by step: chunked prefill in odd chunk sizes (sequences start at different steps, so prefill and
    decode mix), then decode steps. The cache and aux tables start full of garbage (reused blocks)."""

    def __init__(self, lens, hq=4, hkv=2, d=16, block_size=16, dtype=torch.float64, seed=0, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.hq, self.hkv, self.d, self.bs = lens, hq, hkv, d, block_size
        self.dtype, self.device = dtype, device
        self.q = [torch.randn(n, hq, d, generator=g).to(dtype) for n in lens]
        self.k = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lens]
        self.v = [torch.randn(n, hkv, d, generator=g).to(dtype) for n in lens]
        need = [(n + block_size - 1) // block_size for n in lens]
        self.num_blocks = sum(need) + 5
        perm = torch.randperm(self.num_blocks, generator=g)[: sum(need)].tolist()
        self.tables, at = [], 0
        for nb in need:
            self.tables.append(perm[at: at + nb])
            at += nb
        self.gen = g

    def make_cache(self, aux_specs):
        g = self.gen
        shape = (self.num_blocks, self.hkv, self.bs, self.d)
        k = (torch.randn(shape, generator=g) * 7).to(self.dtype).to(self.device)
        v = (torch.randn(shape, generator=g) * 7).to(self.dtype).to(self.device)
        aux = {name: (torch.randn((self.num_blocks,) + tuple(s), generator=g) * 50).to(dt or self.dtype).to(self.device)
               for name, (s, dt) in aux_specs.items()}
        return LayerCache(k, v, aux)

    def schedule(self, prefill_chunks, decode_steps):
        """Yield lists of (seq, first_pos, count) per step."""
        done = [0] * len(self.lens)
        prefill_len = [n - decode_steps for n in self.lens]
        step = 0
        while any(done[i] < prefill_len[i] for i in range(len(self.lens))):
            work = []
            for i in range(len(self.lens)):
                if step < i or done[i] >= prefill_len[i]:  # sequence i joins at step i
                    continue
                n = min(prefill_chunks[(step + i) % len(prefill_chunks)], prefill_len[i] - done[i])
                work.append((i, done[i], n))
                done[i] += n
            step += 1
            yield work
        for _ in range(decode_steps):
            work = [(i, done[i], 1) for i in range(len(self.lens))]
            for i in range(len(self.lens)):
                done[i] += 1
            yield work

    def meta(self, work):
        return AttentionMetadata.for_step([self.tables[i] for i, _, _ in work], [first + n for _, first, n in work],
                                          [n for _, _, n in work], self.bs, self.device, [i for i, _, _ in work])

    def tensors(self, work):
        def cat(xs):
            return torch.cat([xs[i][first: first + n] for i, first, n in work]).to(self.device)
        return cat(self.q), cat(self.k), cat(self.v)

    def run(self, backend, prefill_chunks=(37, 23, 5, 61), decode_steps=3, poison=False):
        cache = self.make_cache(backend.aux_specs(self.hkv, self.d))
        outs = [torch.full((n, self.hq, self.d), float("nan"), dtype=self.dtype) for n in self.lens]
        for work in self.schedule(prefill_chunks, decode_steps):
            meta = self.meta(work)
            q, k, v = self.tensors(work)
            o = backend.forward(0, q, k, v, cache, meta, StepState())
            assert o.shape == q.shape
            at = 0
            for i, first, n in work:
                outs[i][first: first + n] = o[at: at + n].cpu()
                at += n
        return outs, cache

    def functional(self, i, **kw):
        q = self.q[i].transpose(0, 1)[None]
        k = self.k[i].transpose(0, 1)[None]
        v = self.v[i].transpose(0, 1)[None]
        return span_attention(q, k, v, torch.arange(self.lens[i]), block_size=self.bs, **kw)[0].transpose(0, 1)


PAGED_PARAMS = dict(sw_index=3, num_spans=3, backward_factor=2.0, forward_factor=1.0)  # W = 15, block 16


@pytest.mark.parametrize("search,combine,score,sinks", [
    ("summary", "union", "mean", 5), ("summary", "union", "bound", 0), ("summary", "gate", "mean", 0),
    ("summary", "gate", "bound", 0), ("anchor", "gate", "bound", 0), ("anchor", "union", "bound", 20)])
@pytest.mark.parametrize("path", ["gathered", "contiguous", "blocks"])
def test_paged_backend_equals_functional(search, combine, score, sinks, path, monkeypatch):
    """path, for every tile of queries: the CPU path reads the attended keys one by one ("gathered"), runs one
    masked attention over the contiguous keys ("contiguous": union, and tiles without any stripe), or reads
    each KV head's touched key blocks ("blocks", what decode tiles take)."""
    monkeypatch.setattr(ref, "_BLOCK_QUERIES", 10 ** 9 if path == "blocks" else 0)
    monkeypatch.setattr(ref, "_CONTIGUOUS_FACTOR", 0 if path == "gathered" else 10 ** 9)
    sc = PagedScenario([150, 97, 61, 203], seed=3)
    params = dict(PAGED_PARAMS, search=search, combine=combine, score=score, sink_tokens=sinks,
                  span_align="block" if search == "summary" else "anchor")  # the backend's defaults
    backend = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, dict(params, impl="torch", prefill="sparse")))
    outs, cache = sc.run(backend)
    for i in range(len(sc.lens)):
        want = sc.functional(i, impl="torch", **params)
        torch.testing.assert_close(outs[i], want, rtol=1e-10, atol=1e-10)
    if search == "summary":  # the aux tables hold the exact summaries of every block the sequences own
        for i, n in enumerate(sc.lens):
            want = ref.summary_tables(sc.k[i].transpose(0, 1), backend.params, sc.bs)
            blocks = torch.tensor(sc.tables[i])
            for name, table in zip(ref.summary_table_names(backend.params), want):
                torch.testing.assert_close(cache.aux[name][blocks].transpose(0, 1), table, rtol=1e-12, atol=1e-12)


def _random_selection(gen, hq, m, positions, num_spans, sinks):
    """A hand-made selection for queries at `positions`: random spans that overlap each other, reach key 0 or
    the query, are empty (start > end) or invalid; window starts anywhere from 0 (the sequence start) to the
    query; with sinks, a last span [0, min(sinks, window start)) as with_sinks adds it."""
    pos = positions.to(torch.int64)
    sw_start = (torch.rand(m, generator=gen) * (pos + 1).double()).long()
    sw_start[0] = 0
    a = (torch.rand(hq, m, num_spans, generator=gen) * (pos[:, None] + 1).double()).long()
    b = (torch.rand(hq, m, num_spans, generator=gen) * (pos[:, None] + 1).double()).long()
    starts, ends = torch.minimum(a, b), torch.maximum(a, b)
    starts[..., 0] = ends[..., 0] + 1  # an empty span
    if num_spans > 2:
        starts[..., 2], ends[..., 2] = starts[..., 1], ends[..., 1] + 3  # overlaps span 1
    ends = torch.minimum(ends, pos[:, None])
    valid = torch.rand(hq, m, num_spans, generator=gen) < 0.8
    scores = torch.where(valid, torch.randn(hq, m, num_spans, generator=gen), float("-inf"))
    sel = ref.Selection(stripes=torch.zeros_like(starts), scores=scores, valid=valid, starts=starts, ends=ends)
    return ref.with_sinks(sel, sw_start, sinks) if sinks else sel, sw_start


@pytest.mark.parametrize("hkv,group,bs,d,combine,sinks,dtype", [
    (3, 3, 16, 64, "union", 16, torch.float32), (1, 1, 5, 7, "union", 0, torch.float64),
    (2, 3, 7, 9, "union", 6, torch.float64), (3, 1, 4, 5, "gate", 0, torch.float64),
    (1, 3, 3, 8, "gate", 0, torch.float32)])
def test_attend_blocks_equals_attend(hkv, group, bs, d, combine, sinks, dtype):
    """The decode path over key blocks (attend_blocks) against the oracle's masked attention over every key,
    on a paged cache with a shuffled block table and hand-made selections: odd block sizes and head dims, GQA
    1 and 3, overlapping and empty spans, sinks, windows from the sequence start, 1-4 queries; K and V as
    the engine's contiguous caches and as strided views of one tensor (vLLM's layout)."""
    gen = torch.Generator().manual_seed(hkv * 100 + group * 10 + bs)
    hq = hkv * group
    for (n, m), strided in zip([(1, 1), (bs, 1), (bs + 1, 2), (13 * bs + 3, 4), (97, 3)], [False, True] * 3):
        nb = -(-n // bs)
        cache_blocks = nb + 4
        if strided:  # [blocks, Hkv, bs, 2 D] split into K and V
            kv = torch.randn(cache_blocks, hkv, bs, 2 * d, generator=gen).to(dtype)
            pages = kv.view(cache_blocks, hkv, 2 * bs, d)
            k_cache, v_cache = pages[:, :, :bs], pages[:, :, bs:]
        else:
            k_cache = torch.randn(cache_blocks, hkv, bs, d, generator=gen).to(dtype)
            v_cache = torch.randn(cache_blocks, hkv, bs, d, generator=gen).to(dtype)
        table = torch.randperm(cache_blocks, generator=gen)[:nb].to(torch.int32)
        positions = torch.sort(torch.randperm(n, generator=gen)[:m]).values
        positions[-1] = n - 1
        q = torch.randn(hq, m, d, generator=gen).to(dtype)
        sel, sw_start = _random_selection(gen, hq, m, positions, 3, sinks)
        windows_only = ref.Selection(sel.stripes, torch.full_like(sel.scores, float("-inf")),
                                     torch.zeros_like(sel.valid), sel.starts, sel.ends)
        k = dense_ref.gather_kv(k_cache, table, n)
        v = dense_ref.gather_kv(v_cache, table, n)
        for s in (sel, windows_only):
            want = ref.attend(q, k, v, positions, s, sw_start, combine, d ** -0.5)
            got = ref.attend_blocks(q, k_cache, v_cache, table, positions, s, sw_start, combine, d ** -0.5)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_attended_counts_are_the_union_of_window_and_spans():
    gen = torch.Generator().manual_seed(11)
    positions = torch.tensor([5, 40, 99])
    sel, sw_start = _random_selection(gen, 4, 3, positions, 4, sinks=3)
    counts = ref.attended_counts(sel, sw_start, positions)
    for h in range(4):
        for i, p in enumerate(positions.tolist()):
            keys = set(range(int(sw_start[i]), p + 1))
            for j in range(sel.valid.shape[-1]):
                if sel.valid[h, i, j]:
                    keys |= set(range(int(sel.starts[h, i, j]), int(sel.ends[h, i, j]) + 1))
            assert int(counts[h, i]) == len(keys)


def test_attend_blocks_reads_only_the_touched_blocks():
    """Blocks no range of a KV head's group touches are never read: poisoning them leaves the output finite
    and unchanged."""
    gen = torch.Generator().manual_seed(7)
    hkv, group, bs, d, n = 2, 3, 4, 8, 200
    nb = n // bs
    k_cache = torch.randn(nb, hkv, bs, d, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(nb, hkv, bs, d, generator=gen, dtype=torch.float64)
    table = torch.randperm(nb, generator=gen).to(torch.int32)
    positions = torch.tensor([n - 1])
    sw_start = torch.tensor([n - 10])
    starts = torch.tensor([[20, 100], [22, 60], [21, 61]] * hkv).view(hkv * group, 1, 2)
    sel = ref.Selection(stripes=torch.zeros_like(starts), scores=torch.zeros(starts.shape, dtype=torch.float64),
                        valid=torch.ones(starts.shape, dtype=torch.bool), starts=starts, ends=starts + 5)
    q = torch.randn(hkv * group, 1, d, generator=gen, dtype=torch.float64)
    want = ref.attend_blocks(q, k_cache, v_cache, table, positions, sel, sw_start, "union", 0.3)
    touched = {(int(x) // bs) for r in starts.view(-1).tolist() for x in range(r, r + 6)}
    touched |= set(range((n - 10) // bs, nb))
    for blk in set(range(nb)) - touched:
        k_cache[table[blk]] = float("nan")
        v_cache[table[blk]] = float("nan")
    got = ref.attend_blocks(q, k_cache, v_cache, table, positions, sel, sw_start, "union", 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_paged_backend_p055_gqa_groups_of_three():
    sc = PagedScenario([180, 77], hq=6, hkv=2, d=8, block_size=8, seed=4)
    params = dict(sw_index=3, num_spans=2, backward_factor=3.0, forward_factor=1.0, search_power=0.55,
                  span_power=0.55, search="summary", combine="union", score="bound", sink_tokens=0, span_align="block")
    backend = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, dict(params, impl="torch", prefill="sparse")))
    outs, _ = sc.run(backend, prefill_chunks=(13, 29, 3))
    for i in range(len(sc.lens)):
        torch.testing.assert_close(outs[i], sc.functional(i, impl="torch", **params), rtol=1e-10, atol=1e-10)


def test_summary_search_needs_window_of_a_block():
    sc = PagedScenario([40], block_size=16)
    backend = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, {"sw_index": 2, "impl": "torch",
                                                                          "prefill": "sparse"}))  # W = 8
    with pytest.raises(BackendError, match="window"):
        sc.run(backend)


# ----------------------------------------------------------------------------- sparse range attention (Triton)

def _random_ranges(meta, hr, num_ranges, window, gen, disjoint=True):
    """Per token and range head: num_ranges [start, end) ranges below the token's window (disjoint: from
    sorted cut points; else overlapping each other), some empty, and the window starts."""
    tokens = meta.num_tokens
    ranges = torch.zeros(tokens, hr, num_ranges, 2, dtype=torch.int32)
    wstart = torch.zeros(tokens, dtype=torch.int64)
    for t in range(tokens):
        pos = int(meta.positions[t])
        ws = max(0, pos - window + 1)
        wstart[t] = ws
        for h in range(hr):
            cuts = torch.sort(torch.randint(0, ws + 1, (2 * num_ranges,), generator=gen)).values
            if not disjoint:
                cuts = torch.randint(0, ws + 1, (2 * num_ranges,), generator=gen)
            ranges[t, h] = cuts.view(num_ranges, 2).to(torch.int32)
    if not disjoint:
        ranges = torch.sort(ranges, dim=-1).values
    return ranges, wstart


@pytest.mark.parametrize("dtype,gated,hr_kind,path", [
    (torch.float32, False, "query", "split"), (torch.float32, True, "group", "split"),
    (torch.float16, False, "group", "split"), (torch.float16, True, "query", "split"),
    (torch.float32, False, "token", "split"), (torch.float32, False, "query", "tiled"),
    (torch.float16, True, "group", "tiled"), (torch.float32, True, "token", "tiled"),
    (torch.float16, False, "query", "tiled")])
def test_sparse_range_attention_triton_matches_reference(dtype, gated, hr_kind, path):
    from longserve.kernels.reference import sparse as sparse_ref
    from longserve.kernels.triton import sparse as sparse_tri

    sc = PagedScenario([90, 41, 130], hq=4, hkv=2, d=16, block_size=8, dtype=dtype, seed=5)
    cache = sc.make_cache({})
    for i in range(len(sc.lens)):  # fill each sequence's keys
        meta = sc.meta([(i, 0, sc.lens[i])])
        _, k, v = sc.tensors([(i, 0, sc.lens[i])])
        dense_ref.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
    work = [(0, 70, 6), (1, 40, 1), (2, 99, 5)]  # a chunk, a decode token, another chunk
    meta = sc.meta(work)
    q, _, _ = sc.tensors(work)
    hr = {"query": 4, "group": 2, "token": 1}[hr_kind]
    gen = torch.Generator().manual_seed(9)
    ranges, wstart = _random_ranges(meta, hr, 3, 17, gen, disjoint=not gated)
    gates = None
    if gated:
        gates = torch.randn(meta.num_tokens, hr, 3, generator=gen)
        gates[torch.rand(gates.shape, generator=gen) < 0.3] = float("-inf")
        gates[0] = float("-inf")  # a token with no gated range: the window alone
    want, want_lse = sparse_ref.range_attention(q, cache.k, cache.v, meta, ranges, window_start=wstart,
                                                gate_logits=gates)
    sparse_tri.POISON_WORKSPACE = True
    try:
        out = torch.full_like(q, float("nan"))
        got, got_lse = sparse_tri.range_attention(q, cache.k, cache.v, meta, ranges, window_start=wstart,
                                                  gate_logits=gates, max_range_len=131, max_window_len=17,
                                                  chunk=64, path=path, out=out)
    finally:
        sparse_tri.POISON_WORKSPACE = False
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if not gated:
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ superlinear Triton kernels

@pytest.mark.parametrize("search,combine,dtype,heads,kw", [
    ("anchor", "gate", torch.float32, (4, 2), {}),
    ("summary", "union", torch.float16, (4, 2), {}),
    ("summary", "gate", torch.float32, (3, 1), dict(search_power=0.55, span_power=0.55, backward_factor=3.0)),
    ("anchor", "union", torch.float16, (2, 2), dict(num_spans=2, forward_factor=0.0)),
    ("summary", "union", torch.float32, (4, 2), dict(score="mean", sink_tokens=5)),
    ("summary", "gate", torch.float16, (3, 1), dict(score="mean", search_power=0.55, span_power=0.55)),
    ("anchor", "union", torch.float16, (4, 2), dict(sink_tokens=40)),  # sinks longer than a span
    ("summary", "union", torch.float32, (3, 1), dict(score="mean", span_align="block", sink_tokens=5, num_spans=5)),
    ("summary", "gate", torch.float16, (4, 2), dict(score="mean", span_align="block", search_power=0.55,
                                                    span_power=0.55)),
    ("summary", "union", torch.float16, (4, 2), dict(span_align="block", num_spans=4, backward_factor=0.5,
                                                     forward_factor=0.5)),
])
def test_triton_span_attention_matches_reference(search, combine, dtype, heads, kw):
    from longserve.kernels.triton import sparse as sparse_tri

    q, k, v, _ = _inputs(21, 1, heads[0], heads[1], 300, 4, 16, dtype=dtype)
    positions = torch.tensor([299, 5, 137, 250])  # 5: below the window (dense)
    kw = dict(kw, sw_index=3, search=search, combine=combine, block_size=16)
    want = span_attention(q, k, v, positions, impl="torch", **kw)
    sparse_tri.POISON_WORKSPACE = True
    try:
        got = span_attention(q, k, v, positions, impl="triton", **kw)
    finally:
        sparse_tri.POISON_WORKSPACE = False
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_triton_q_search():
    q, k, v, _ = _inputs(22, 1, 2, 1, 200, 3, 16, dtype=torch.float32)
    q_search = torch.randn_like(q)
    positions = torch.tensor([199, 120, 64])
    kw = dict(sw_index=3, search="anchor", combine="gate", q_search=q_search)
    torch.testing.assert_close(span_attention(q, k, v, positions, impl="triton", **kw),
                               span_attention(q, k, v, positions, impl="torch", **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("search,combine,dtype,path,extra", [
    ("summary", "union", torch.float32, "tiled", {}), ("anchor", "gate", torch.float16, "split", {}),
    ("summary", "gate", torch.float16, "tiled", {}),
    ("summary", "union", torch.float16, "split", {"score": "mean", "sink_tokens": 3}),
    ("summary", "union", torch.float32, "tiled", {"score": "mean", "sink_tokens": 3}),
    ("summary", "union", torch.float16, "split", {"score": "mean", "sink_tokens": 3, "span_align": "block"}),
    ("summary", "gate", torch.float32, "tiled", {"score": "mean", "span_align": "block", "num_spans": 2})])
def test_triton_paged_forward_matches_reference(search, combine, dtype, path, extra, monkeypatch):
    """Chunked prefill then decode through the Triton path (output and workspace poisoned with NaN) equals
    the backend's PyTorch path step for step, and the Triton bound update equals the PyTorch one."""
    from longserve.kernels.triton import sparse as sparse_tri
    from longserve.kernels.triton import superlinear as tri

    # "tiled": every step (prefill chunks and decode tokens) through the prefill kernels
    monkeypatch.setattr(sparse_tri, "_TILED_MIN_TOKENS", 1 if path == "tiled" else 10 ** 9)
    sc = PagedScenario([29, 13], hq=4, hkv=2, d=16, block_size=8, dtype=dtype, seed=8)
    params = dict(sw_index=2, search=search, combine=combine, **extra)  # W = 8
    backend = SuperlinearBackend(AttentionPlan.uniform("superlinear", 1, dict(params, impl="torch", prefill="sparse")))
    ref_cache = sc.make_cache(backend.aux_specs(sc.hkv, sc.d))
    tri_cache = LayerCache(ref_cache.k.clone(), ref_cache.v.clone(), {n: t.clone() for n, t in ref_cache.aux.items()})
    sparse_tri.POISON_WORKSPACE = True
    try:
        for work in sc.schedule((11, 5), decode_steps=1):
            meta = sc.meta(work)
            q, k, v = sc.tensors(work)
            want = backend.forward(0, q, k, v, ref_cache, meta, StepState())
            out = torch.full_like(q, float("nan"))
            got = tri.paged_forward(q, k, v, tri_cache, sc.meta(work), backend.params, out=out)
            assert got.data_ptr() == out.data_ptr()
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    finally:
        sparse_tri.POISON_WORKSPACE = False
    for name, table in ref_cache.aux.items():  # min/max exact; the mean rounds its float32 sum in another order
        tol = 0 if name != "kmean" else (1e-6 if dtype == torch.float32 else 1e-3)
        torch.testing.assert_close(tri_cache.aux[name], table, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- engine

def test_engine_serves_with_superlinear(tmp_path):
    """Through the engine: below the window superlinear attention is dense attention (same greedy tokens);
    a short window changes them; bad parameters are a one-line error."""
    from longserve.engine import LLM, SamplingParams
    from longserve.engine.testing import tiny_checkpoint

    path = str(tiny_checkpoint(tmp_path / "tiny"))
    prompts = ["span attention reads a few spans and a window " * 3, "a second prompt"]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    kw = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=64)

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    dense = tokens(LLM(model=path, attention="dense", **kw))
    assert tokens(LLM(model=path, attention="superlinear", **kw)) == dense
    short = tokens(LLM(model=path, attention="superlinear", attention_config={
        "sw_index": 3, "search": "anchor", "combine": "gate", "num_spans": 1}, **kw))
    assert short != dense
    with pytest.raises(Exception, match=r"search_power must be a number in \(0, 1\)"):
        LLM(model=path, attention="superlinear", attention_config={"search_power": 1.5}, **kw)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every superlinear/sparse kernel compiles for sm_90 with Triton's bundled ptxas (no GPU needed), in
    bfloat16 without register spills, tensor-core MMAs in the tiled prefill kernels. Runs in a subprocess:
    this module's kernels were decorated for the interpreter."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, longserve.bench.gpu_superlinear\n"
            "from longserve.bench import kernel_report as kr\n"
            "sys.exit(kr.main(['--only', 'superlinear']))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("_")]
    assert {line.split()[0] for line in lines} >= {
        "_update_summaries_kernel", "_block_bounds_kernel", "_stripe_topk_kernel", "_select_kernel",
        "_range_split_kernel", "_range_combine_kernel", "_range_tile_kernel", "_window_tile_kernel"}
    assert all(" stack=0 " in line for line in lines), proc.stdout
    assert all("GMMA" in line for line in lines if line.startswith(("_range_tile", "_window_tile"))), proc.stdout


@pytest.mark.slow
def test_gpu_suite_rows_run_at_tiny_shapes():
    """The GPU suite's superlinear checks (search against the float64 reference, needles) and the decode
    timing row run in the interpreter at tiny shapes: the suite module itself works."""
    from longserve.bench import gpu_superlinear as rows
    from longserve.bench.gpu_suite import SuiteContext

    ctx = SuiteContext(torch.device("cpu"), quick=True, budget_s=600)
    results = list(rows.check_search(ctx)) + list(rows.check_needle(ctx))
    assert results and all(r.passed for r in results), [(r.case, r.error, r.detail) for r in results]
    timings = list(rows.time_decode(ctx))
    assert len(timings) == 2 and all(t.ms and t.baseline_ms for t in timings)
