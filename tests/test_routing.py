"""Routing attention: k-means primitives and kernels against their references, cluster tables, routing against
dense attention, the planted needle, per-sequence state lifetime."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402

from longserve.kernels.base import AttentionMetadata, BackendError, LayerCache, StepState  # noqa: E402
from longserve.kernels.plan import AttentionPlan, LayerPlan  # noqa: E402
from longserve.kernels.reference import dense as ref_dense  # noqa: E402
from longserve.kernels.reference import routing as ref  # noqa: E402
from longserve.kernels.routing import RoutingBackend, validate_params  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SMALL = {"segment_tokens": 32, "tokens_per_cluster": 4, "kmeans_iters": 2, "sink_tokens": 2, "window": 5,
         "prefill_tile": 7, "budget_tokens": 12}


# ---------------------------------------------------------------- a tiny paged world

class World:
    """Paged caches for one layer, sequences with fixed random Q/K/V, and a step driver."""

    def __init__(self, hkv=2, group=2, d=16, block_size=4, num_blocks=256, dtype=torch.float32, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.hkv, self.hq, self.d, self.bs, self.dtype = hkv, hkv * group, d, block_size, dtype
        shape = (num_blocks, hkv, block_size, d)
        self.cache = LayerCache(torch.zeros(shape, dtype=dtype, device=DEVICE),
                                torch.zeros(shape, dtype=dtype, device=DEVICE))
        self.free = torch.randperm(num_blocks, generator=self.g).tolist()  # scattered physical blocks
        self.seqs: dict[int, dict] = {}

    def add(self, seq_id: int, n: int, q=None, k=None, v=None):
        q = torch.randn(n, self.hq, self.d, generator=self.g) if q is None else q
        k = torch.randn(n, self.hkv, self.d, generator=self.g) if k is None else k
        v = torch.randn(n, self.hkv, self.d, generator=self.g) if v is None else v
        blocks = [self.free.pop() for _ in range(-(-n // self.bs))]
        self.seqs[seq_id] = {"q": q.to(self.dtype), "k": k.to(self.dtype), "v": v.to(self.dtype),
                             "blocks": blocks, "done": 0}

    def step(self, chunks: dict[int, int]):
        """One step: sequence seq_id advances by chunks[seq_id] tokens. Returns (q, k, v, meta)."""
        qs, ks, vs = [], [], []
        for sid, n in chunks.items():
            s = self.seqs[sid]
            a, b = s["done"], s["done"] + n
            qs.append(s["q"][a:b]); ks.append(s["k"][a:b]); vs.append(s["v"][a:b])
            s["done"] = b
        meta = AttentionMetadata.for_step([self.seqs[sid]["blocks"] for sid in chunks],
                                          [self.seqs[sid]["done"] for sid in chunks], list(chunks.values()), self.bs,
                                          DEVICE, list(chunks))
        return torch.cat(qs).to(DEVICE), torch.cat(ks).to(DEVICE), torch.cat(vs).to(DEVICE), meta

    def dense(self, q, meta):
        return ref_dense.paged_attention(q, self.cache.k, self.cache.v, meta)


def backend(params=None, layers=1, impl="torch", modes=None):
    plan = AttentionPlan("routing", modes or [LayerPlan("compute")] * layers,
                         {**SMALL, "prefill": "sparse", **(params or {})})  # prompt chunks routed too
    return RoutingBackend(plan, impl=impl)


def run_schedule(world, be, schedule, compare_dense=False, atol=1e-5):
    """Drive the steps of `schedule` (a list of {seq_id: tokens}); return the outputs and selections."""
    outs, sels = [], []
    for chunks in schedule:
        q, k, v, meta = world.step(chunks)
        state = StepState()
        out = be.forward(0, q, k, v, world.cache, meta, state)
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
        if compare_dense:
            torch.testing.assert_close(out, world.dense(q, meta), atol=atol, rtol=atol)
        outs.append(out)
        sels.append(state.selections[0])
    return outs, sels


def decode_schedule(prompt: dict[int, list[int]], decode_steps: int):
    """Prefill chunks per sequence (interleaved), then decode steps of every sequence together."""
    sched = []
    for i in range(max(len(c) for c in prompt.values())):
        step = {sid: c[i] for sid, c in prompt.items() if i < len(c)}
        sched.append(step)
    sched += [{sid: 1 for sid in prompt}] * decode_steps
    return sched


# ---------------------------------------------------------------- routing == dense with a covering budget

def test_covering_budget_equals_dense():
    world = World(seed=1)
    world.add(7, 150)
    world.add(9, 120)
    be = backend({"budget_tokens": 10**6})
    sched = decode_schedule({7: [40, 23, 30, 20], 9: [64, 1, 33]}, 14)
    _, sels = run_schedule(world, be, sched, compare_dense=True)
    # Routing really ran: both sequences have codebooks and the last selections routed keys.
    for sid in (7, 9):
        assert be.table(sid, 0).num_closed == world.seqs[sid]["done"] // 32
    assert (sels[-1].routed_count > 0).all()


def test_covering_budget_frac_equals_dense_single_token_tiles():
    world = World(seed=2, hkv=1, group=3, d=8)
    world.add(1, 100)
    be = backend({"budget_frac": 1.0, "prefill_tile": 1, "sink_tokens": 0, "window": 1})
    run_schedule(world, be, [{1: 37}, {1: 30}, {1: 1}, {1: 32}], compare_dense=True)


def test_prefix_cached_keys_are_clustered_from_the_cache():
    # A sequence arriving with 80 keys already in the cache (a prefix-cache hit, or a recompute) builds its
    # tables from the cache; with a covering budget it still equals dense.
    world = World(seed=3)
    world.add(5, 100)
    s = world.seqs[5]
    q, k, v, meta = world.step({5: 80})
    ref_dense.write_kv(world.cache.k, world.cache.v, k, v, meta.slot_mapping)  # written by "someone else"
    be = backend({"budget_tokens": 10**6})
    run_schedule(world, be, [{5: 10}, {5: 1}, {5: 1}], compare_dense=True)
    table = be.table(5, 0)
    assert table.num_closed == 2 and s["done"] == 92


# ---------------------------------------------------------------- selections with a small budget

def check_selection(sel, table_sizes_max, params):
    sink = params["sink_tokens"]
    for t, tile in enumerate(sel.tiles):
        for h in range(sel.routed.shape[1]):
            n = int(sel.routed_count[t, h])
            routed = sel.routed[t, h, :n].long()
            assert (sel.routed[t, h, n:] == -1).all()
            assert routed.unique().numel() == n  # each key once
            assert ((routed >= sink) & (routed < tile.local_lo)).all()  # disjoint from sinks and window
            routable = max(0, tile.local_lo - sink)
            assert min(tile.budget, routable) <= n < tile.budget + table_sizes_max or n == routable
            pos = sel.positions(t, h)
            assert pos.unique().numel() == pos.numel()


def test_small_budget_selection_is_bounded_and_disjoint():
    world = World(seed=4)
    world.add(1, 140)
    world.add(2, 90)
    params = {**SMALL, "budget_tokens": 9}
    be = backend(params)
    sched = decode_schedule({1: [50, 50, 20], 2: [70, 10]}, 8)
    outs, sels = run_schedule(world, be, sched)
    q, k, v, meta = world.step({1: 1, 2: 1})
    dense = world.dense(q, meta)  # the step is not run by the backend: dense only for comparison below
    for sel in sels:
        biggest = max(int(be.table(s, 0).size.max()) for s in (1, 2))
        check_selection(sel, biggest + 1, params)
    # Routing really dropped keys: later decode tiles attend to fewer keys than they see.
    last = sels[-1]
    for t, tile in enumerate(last.tiles):
        assert last.positions(t, 0).numel() < tile.last_pos + 1
    assert dense.shape == q.shape



def test_default_segment_makes_a_short_context_sparse():
    """With the default segment size a 1.5K-token sequence already has a codebook: its decode token attends
    sinks + window + about the budget, not every key (a 4096-key segment left 2K-4K prompts dense)."""
    world = World(hkv=1, group=2, d=8, block_size=16, num_blocks=128, seed=7)
    world.add(1, 1501)
    plan = AttentionPlan("routing", [LayerPlan("compute")], {"budget_tokens": 128, "window": 64})
    be = RoutingBackend(plan, impl="torch")
    for n in (1500, 1):  # a dense prompt chunk (the default prefill), then one routed decode token
        q, k, v, meta = world.step({1: n})
        state = StepState()
        be.forward(0, q, k, v, world.cache, meta, state)
    table = be.table(1, 0)
    assert table is not None and table.has_codebook
    attended = state.selections[0].positions(0, 0).numel()
    largest_cluster = int(table.size.max())
    assert attended <= 16 + 64 + 128 + largest_cluster
    assert attended < 1501 // 4

# ---------------------------------------------------------------- online k-means

def _table_world(n, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs = 4
    kc = torch.zeros(-(-n // bs) + 3, hkv, bs, d)
    table = torch.randperm(kc.shape[0], generator=g)[: -(-n // bs)].to(torch.int32)
    keys = torch.randn(n, hkv, d, generator=g)
    pos = torch.arange(n)
    slots = table[pos // bs].long() * bs + pos % bs
    ref_dense.write_kv(kc, kc.clone(), keys, keys, slots)
    return kc, table, keys


def _check_tables(t: ref.ClusterTable, keys: torch.Tensor):
    """The stored tables agree with a recomputation from each member list."""
    for h in range(t.heads):
        seen = []
        for c in range(t.num_clusters):
            a, n = int(t.start[h, c]), int(t.size[h, c])
            members = t.perm[h, a:a + n].long()
            seen.append(members)
            assert (t.cid[h, a:a + n] == c).all()
            assert (members[1:] > members[:-1]).all()  # ascending
            seg = c // t.clusters_per_segment
            lo = seg * t.segment_tokens
            assert ((members >= lo) & (members < lo + t.segment_tokens)).all()
            if n:
                torch.testing.assert_close(t.mean[h, c], keys[members, h].mean(0), atol=1e-5, rtol=1e-5)
            assert int(t.pre_sink[h, c]) == int((members < t.sink_tokens).sum())
        allm = torch.cat(seen).sort().values
        assert torch.equal(allm, torch.arange(t.num_members))


def test_online_assignment_matches_recomputation_with_updated_centroids():
    n, S = 100, 32
    kc, table_row, keys = _table_world(n)
    t = ref.ClusterTable(2, 8, S, 4, 3, torch.device("cpu"))
    decay = 0.9
    t.catch_up(kc, table_row, 40, need_below=40, kmeans_iters=2, decay=decay)
    assert t.num_closed == 1 and t.num_open == 8 and t.num_seen == 40
    _check_tables(t, keys)
    for upto in (55, 56, 63):
        before = t.live.clone().double()
        start = t.num_seen
        t.catch_up(kc, table_row, upto, need_below=upto, kmeans_iters=2, decay=decay)
        new = keys[start:upto].transpose(0, 1).double()  # [H, n, D]
        scores = new @ before.transpose(1, 2)
        want = scores.argmax(-1)
        got = t.open_assign[:, start - S:upto - S].long()
        top2 = scores.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-9
        assert torch.equal(got[clear], want[clear])
        # The live centroids moved by the EMA rule, computed from scratch in float64.
        unit = new / new.norm(dim=-1, keepdim=True)
        for h in range(2):
            for c in range(4):
                mine = got[h] == c
                m = int(mine.sum())
                expect = before[h, c]
                if m:
                    w = decay ** m
                    expect = w * before[h, c] + (1 - w) * unit[h, mine].mean(0)
                    expect = expect / expect.norm()
                torch.testing.assert_close(t.live[h, c].double(), expect, atol=1e-6, rtol=1e-6)
        _check_tables(t, keys)
    # Completing the segment re-clusters it by k-means; the live codebook restarts from it.
    t.catch_up(kc, table_row, n, need_below=0, kmeans_iters=2, decay=decay)
    assert t.num_closed == 3 and t.num_open == 0 and t.num_seen == 96
    _check_tables(t, keys)


def test_lazy_assignment_waits_for_keys_leaving_the_window():
    kc, table_row, keys = _table_world(80)
    t = ref.ClusterTable(2, 8, 32, 4, 0, torch.device("cpu"))
    t.catch_up(kc, table_row, 40, need_below=32, kmeans_iters=1, decay=0.99)
    assert (t.num_closed, t.num_seen) == (1, 32)  # keys 32..39 are all in the local region still
    t.catch_up(kc, table_row, 45, need_below=33, kmeans_iters=1, decay=0.99)
    assert t.num_seen == 45 and t.num_open == 13  # key 32 leaves: everything written so far is assigned


def test_kmeans_reference_is_a_fixed_point_and_decreases_distortion():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(3, 6, 16, generator=g)
    keys = (centers.repeat_interleave(20, dim=1) + 0.05 * torch.randn(3, 120, 16, generator=g))
    unit = keys / keys.norm(dim=-1, keepdim=True)

    def cohesion(cent, a):
        return (unit * cent.gather(1, a.long().unsqueeze(-1).expand(-1, -1, 16))).sum(-1).mean()

    c0 = ref.initial_centroids(keys, 6)
    c5, a5, sums, counts = ref.kmeans(keys, 6, 5)
    assert cohesion(c5, a5) >= cohesion(c0, ref.assign(keys, c0)) - 1e-6
    assert torch.equal(a5, ref.assign(keys, c5))
    assert int(counts.sum()) == 3 * 120
    onehot = torch.nn.functional.one_hot(a5.long(), 6).float()
    torch.testing.assert_close(sums, onehot.transpose(1, 2) @ keys)
    # Contiguous groups: the evenly spaced start hits each group once, so the groups are recovered exactly.
    assert torch.equal(a5, torch.arange(6).repeat_interleave(20).expand(3, -1).to(torch.int32))


# ---------------------------------------------------------------- the needle

@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_planted_needle_is_routed_to_and_attended(impl):
    g = torch.Generator().manual_seed(11)
    n, d, hkv, group = 700, 32, 2, 2
    world = World(hkv=hkv, group=group, d=d, block_size=8, seed=11)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    q = torch.randn(n, hkv * group, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    needle = 233
    k[needle] = 16.0 * direction  # strongly aligned with the last query, hidden among random keys
    v[needle] = 5.0
    q[-1] = 6.0 * direction
    world.add(1, n, q, k, v)
    be = backend({"segment_tokens": 128, "tokens_per_cluster": 8, "budget_tokens": 35, "window": 16,
                  "sink_tokens": 4, "prefill_tile": 64}, impl=impl)
    outs, sels = run_schedule(world, be, [{1: 256}, {1: 256}, {1: n - 513}, {1: 1}])
    sel = sels[-1]
    for h in range(hkv):
        routed = sel.routed[0, h, :int(sel.routed_count[0, h])]
        assert needle in routed.tolist()
        assert int(sel.routed_count[0, h]) < 35 + 8 * 6  # a small share of the 700 keys
    # Nearly all attention goes to the needle: the output is close to its value, as with dense attention.
    assert (outs[-1][0] - 5.0).abs().max() < 0.2


# ---------------------------------------------------------------- state lifetime

def test_free_sequence_drops_state_and_rebuild_is_identical():
    world = World(seed=6)
    world.add(1, 100)
    world.add(2, 100)
    be = backend(layers=2)
    sched = decode_schedule({1: [45, 40], 2: [80]}, 3)
    first = []
    for chunks in sched:
        q, k, v, meta = world.step(chunks)
        st = StepState()
        be.forward(0, q, k, v, world.cache, meta, st)
        first.append(be.forward(1, q, k, v, world.cache, meta, st))
    assert be.tracked_sequences() == [1, 2] and be.state_bytes() > 0
    one = be.state_bytes()
    be.free_sequence(2)
    assert be.tracked_sequences() == [1] and 0 < be.state_bytes() < one
    be.free_sequence(1)
    be.free_sequence(12345)  # unknown ids are fine
    assert be.tracked_sequences() == [] and be.state_bytes() == 0
    # A preempted sequence is recomputed from scratch: the same steps give the same outputs.
    for s in world.seqs.values():
        s["done"] = 0
    for chunks, want in zip(sched, first):
        q, k, v, meta = world.step(chunks)
        st = StepState()
        be.forward(0, q, k, v, world.cache, meta, st)
        torch.testing.assert_close(be.forward(1, q, k, v, world.cache, meta, st), want, atol=0, rtol=0)


def test_rewritten_sequence_without_free_is_rebuilt():
    world = World(seed=8)
    world.add(3, 80)
    be = backend({"budget_tokens": 10**6})
    run_schedule(world, be, [{3: 70}])
    world.seqs[3]["done"] = 0
    world.seqs[3]["k"] = torch.randn_like(world.seqs[3]["k"])  # a recompute writes different keys
    run_schedule(world, be, [{3: 40}, {3: 30}, {3: 1}], compare_dense=True)


# ---------------------------------------------------------------- parameters and plans

@pytest.mark.parametrize("bad, match", [
    ({"budget_tokens": -1}, "budget_tokens"), ({"decay": 1.5}, "decay"), ({"decay": "x"}, "decay"),
    ({"window": 0}, "window"), ({"budget_frac": 0.0}, "budget_frac"), ({"sink_tokens": 4096}, "sink_tokens"),
    ({"clusters_per_segment": 5000}, "clusters_per_segment"), ({"kmeans_iters": 1.5}, "kmeans_iters"),
    ({"segment_token": 10}, "unknown"), ({"prefill_tile": True}, "prefill_tile"),
])
def test_bad_params_raise_one_line_errors(bad, match):
    with pytest.raises(BackendError, match=match) as e:
        validate_params(bad)
    assert "\n" not in str(e.value)


def test_param_defaults():
    p = validate_params({})
    assert (p["segment_tokens"], p["clusters_per_segment"], p["kmeans_iters"], p["decay"]) == (1024, 64, 4, 0.999)
    assert (p["budget_tokens"], p["budget_frac"], p["sink_tokens"], p["window"]) == (2048, None, 16, 1024)
    assert validate_params({"clusters_per_segment": 10})["clusters_per_segment"] == 10
    assert validate_params({"tokens_per_cluster": 100, "segment_tokens": 1000})["clusters_per_segment"] == 10


def test_reuse_and_full_layers():
    world = World(seed=9)
    world.add(1, 90)
    modes = [LayerPlan("compute"), LayerPlan("reuse", 0), LayerPlan("full")]
    be = backend(modes=modes)
    for chunks in [{1: 60}, {1: 1}]:
        q, k, v, meta = world.step(chunks)
        st = StepState()
        a = be.forward(0, q, k, v, world.cache, meta, st)
        b = be.forward(1, q, k, v, world.cache, meta, st)  # same cache: reuse attends to the same keys
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(be.forward(2, q, k, v, world.cache, meta, st), world.dense(q, meta))
    assert be.table(1, 1) is None  # reuse layers keep no tables
    with pytest.raises(BackendError, match="reuses layer 0"):
        q, k, v, meta = world.step({1: 1})
        be.forward(1, q, k, v, world.cache, meta, StepState())


# ---------------------------------------------------------------- Triton kernels against the references

def _tri():
    from longserve.kernels.triton import routing as tri
    return tri


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, n, c, d", [(3, 77, 13, 24), (1, 5, 40, 8), (2, 130, 64, 64)])
def test_assign_kernel_matches_reference(dtype, b, n, c, d):
    g = torch.Generator().manual_seed(b * 1000 + n)
    keys = torch.randn(b, n, d, generator=g).to(dtype).to(DEVICE)
    cent = torch.randn(b, c, d, generator=g)
    cent = (cent / cent.norm(dim=-1, keepdim=True)).to(DEVICE)
    out = torch.full((b, n), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    got = _tri().assign(keys, cent, out=out)
    assert got.data_ptr() == out.data_ptr() and ((got >= 0) & (got < c)).all()
    scores = keys.double() @ cent.double().transpose(1, 2)
    want = ref.assign(keys, cent)
    top2 = scores.topk(min(2, c), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1]) > 1e-4 if c > 1 else torch.ones_like(want, dtype=torch.bool)
    assert torch.equal(got[clear], want[clear])
    chosen = scores.gather(2, got.long().unsqueeze(-1)).squeeze(-1)
    assert (chosen >= top2[..., 0] - 1e-4).all()  # near-ties: still a best centroid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("decay", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("b, n, c, d", [(3, 77, 13, 24), (2, 200, 70, 16)])
def test_update_kernel_matches_reference(dtype, decay, b, n, c, d):
    g = torch.Generator().manual_seed(n + c)
    keys = torch.randn(b, n, d, generator=g).to(dtype).to(DEVICE)
    a = torch.randint(0, c - 3, (b, n), generator=g).to(torch.int32).to(DEVICE)  # the last clusters stay empty
    cent = torch.randn(b, c, d, generator=g)
    cent = (cent / cent.norm(dim=-1, keepdim=True)).to(DEVICE)
    poison = (torch.full((b, c, d), float("nan"), device=DEVICE), torch.full((b, c, d), float("nan"), device=DEVICE),
              torch.full((b, c), -1, dtype=torch.int32, device=DEVICE))
    new, raw, cnt = _tri().update_centroids(keys, a, cent, decay, out=poison)
    want_new, want_raw, want_cnt = ref.update_centroids(keys, a, cent, decay)
    assert torch.equal(cnt, want_cnt) and int(cnt[:, -3:].sum()) == 0
    torch.testing.assert_close(raw, want_raw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(new, want_new, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[:, -3:], cent[:, -3:])  # empty clusters keep their centroid


def test_kmeans_with_triton_ops_matches_reference():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 96, 16, generator=g).to(DEVICE)
    c1, a1, s1, n1 = ref.kmeans(keys, 7, 3)
    c2, a2, s2, n2 = ref.kmeans(keys, 7, 3, ops=_tri())
    assert torch.equal(a1, a2) and torch.equal(n1, n2)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_attend_kernel_matches_reference(dtype, splits, monkeypatch):
    tri = _tri()
    monkeypatch.setattr(tri, "POISON_WORKSPACE", True)
    world = World(hkv=2, group=3, d=24, block_size=4, dtype=dtype, seed=13)
    world.add(1, 90)
    world.add(2, 61)
    be = backend({"budget_tokens": 7, "prefill_tile": 5})
    # Earlier steps only build the tables; the checked step mixes a prefill chunk and a decode token.
    for chunks in [{1: 60, 2: 40}, {1: 29, 2: 20}]:
        q, k, v, meta = world.step(chunks)
        be.forward(0, q, k, v, world.cache, meta, StepState())
    q, k, v, meta = world.step({1: 1, 2: 1})
    ref_dense.write_kv(world.cache.k, world.cache.v, k, v, meta.slot_mapping)
    sel = be.select(0, q, world.cache, meta)
    assert (sel.routed_count > 0).all()
    want, want_lse = ref.attend(q, world.cache.k, world.cache.v, meta.block_tables, sel, return_lse=True)
    out = torch.full_like(q, float("nan"))
    got, got_lse = tri.attend(q, world.cache.k, world.cache.v, meta.block_tables, sel, return_lse=True,
                              num_splits=splits, out=out)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attend_kernel_prefill_tiles_match_reference(dtype, monkeypatch):
    tri = _tri()
    monkeypatch.setattr(tri, "POISON_WORKSPACE", True)
    world = World(hkv=1, group=4, d=8, block_size=8, dtype=dtype, seed=14)
    world.add(4, 120)
    be = backend({"budget_tokens": 5, "prefill_tile": 9, "window": 3})
    q, k, v, meta = world.step({4: 70})
    be.forward(0, q, k, v, world.cache, meta, StepState())
    q, k, v, meta = world.step({4: 47})  # 6 tiles, the last one short; prior context routed
    ref_dense.write_kv(world.cache.k, world.cache.v, k, v, meta.slot_mapping)
    sel = be.select(0, q, world.cache, meta)
    assert (sel.routed_count > 0).all()
    want = ref.attend(q, world.cache.k, world.cache.v, meta.block_tables, sel)
    got = tri.attend(q, world.cache.k, world.cache.v, meta.block_tables, sel, out=torch.full_like(q, float("nan")))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_triton_backend_covering_budget_equals_dense():
    world = World(seed=15, hkv=2, group=2, d=16)
    world.add(1, 90)
    world.add(2, 70)
    be = backend({"budget_tokens": 10**6}, impl="triton")
    run_schedule(world, be, decode_schedule({1: [50, 35], 2: [66]}, 2), compare_dense=True, atol=1e-4)
    assert be.table(1, 0).num_closed == 2


# ---------------------------------------------------------------- through the engine

@pytest.mark.slow
def test_engine_routing_with_covering_budget_generates_like_dense_and_frees_state(tmp_path):
    from longserve.engine import LLM, SamplingParams
    from longserve.engine.testing import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "llama", arch="llama")
    prompts = [[(7 * i + 3 * j + 1) % 200 + 1 for j in range(n)] for i, n in enumerate([70, 45])]
    prompts.append(prompts[0][:60] + [9, 9, 9])  # a prefix-cache hit on the first prompt's blocks
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    opts = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=512, max_num_batched_tokens=32)
    dense = [o.outputs[0].token_ids for o in LLM(model=str(ckpt), **opts).generate(prompts, greedy)]
    cfg = {**SMALL, "budget_tokens": 10**6}
    llm = LLM(model=str(ckpt), attention="routing", attention_config=cfg, **opts)
    routed = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert routed == dense
    method = llm.engine.backend.method
    assert method.tracked_sequences() == [] and method.state_bytes() == 0  # freed with the requests
    # A tight budget still runs end to end (and differs from dense only through the dropped keys).
    tight = LLM(model=str(ckpt), attention="routing", attention_config={**SMALL, "budget_tokens": 4}, **opts)
    outs = tight.generate(prompts, greedy)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert tight.engine.backend.method.tracked_sequences() == []
