"""Block manager and scheduler without a model: allocation, prefix hits, preemption, freeing."""

from longserve.engine.block_manager import BlockManager
from longserve.engine.sampling_params import SamplingParams
from longserve.engine.scheduler import Scheduler
from longserve.engine.sequence import Request


def make_seq(tokens):
    return Request("r", tokens, SamplingParams(max_tokens=4)).seqs[0]


def test_prefix_hit_reuses_blocks_and_keeps_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(12)))
    bm.match_prefix(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.register_full_blocks(a)
    b = make_seq(list(range(12)))
    # 12 tokens = 3 full blocks, but one token must be computed: only 2 blocks come from the cache.
    assert bm.match_prefix(b) == (2, 2)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    c = make_seq(list(range(8)) + [99, 98, 97, 96, 95])
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:2]
    for s in (a, b, c):
        bm.free_sequence(s)
    assert bm.num_free_blocks == 16 and all(r == 0 for r in bm.ref_counts)


def test_freed_cached_blocks_still_hit_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    table = list(a.block_table)
    bm.free_sequence(a)
    b = make_seq([1, 2, 3, 4, 5, 6])
    bm.match_prefix(b)
    assert b.block_table == table[:2]
    bm.free_sequence(b)
    # Exhaust the pool: cached blocks are evicted last, then their hashes are gone.
    c = make_seq(list(range(100, 108)))
    bm.allocate(c, 8)
    bm.free_sequence(c)
    d = make_seq([1, 2, 3, 4, 5])
    bm.match_prefix(d)
    assert d.block_table == []


def test_scheduler_chunks_prefill_and_preempts_when_blocks_run_out():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=7)
    seqs = [make_seq(list(range(10))) for _ in range(2)]
    for s in seqs:
        sched.add(s)
    steps = 0
    preempted = []
    sched.on_preempt = preempted.append
    while any(s.num_computed_tokens < len(s.token_ids) for s in seqs) and steps < 50:
        batch = sched.schedule()
        assert sum(x.num_tokens for x in batch) <= 7
        for x in batch:
            x.seq.num_computed_tokens += x.num_tokens
        steps += 1
    assert all(s.num_computed_tokens == 10 for s in seqs)
    # Grow both sequences past capacity: 2 x 3 blocks = 6; one more token each needs a 7th block.
    for s in seqs:
        s.token_ids += [1, 2, 3]
    batch = sched.schedule()
    assert preempted, "expected a preemption when blocks ran out"
    assert sched.num_preemptions >= 1
    for s in seqs:
        sched.remove(s)
    assert bm.num_free_blocks == 6


def test_prefix_counters_count_a_waiting_sequence_once():
    """A waiting sequence whose prefix hits but which cannot get its other blocks is matched and released at
    every step; its lookup counts once, when it is admitted."""
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    cached = make_seq(list(range(9)))  # 3 blocks, the first 2 full and published
    bm.allocate(cached, 9)
    cached.num_computed_tokens = 9
    bm.register_full_blocks(cached)
    hog = make_seq(list(range(100, 112)))
    bm.allocate(hog, 12)  # the 3 other blocks: none free
    waiter = make_seq(list(range(8)) + list(range(50, 59)))  # 2 cached blocks + 3 new ones
    sched.add(waiter)
    for _ in range(5):
        assert sched.schedule() == []
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)
    bm.free_sequence(hog)
    assert [s.seq for s in sched.schedule()] == [waiter]
    assert waiter.num_cached_tokens == 8
    assert (bm.prefix_queries, bm.prefix_hits) == (3, 2)  # 2 hits, then the miss that ends the lookup
