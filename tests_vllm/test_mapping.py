"""The plugin's mapping of vLLM's step metadata and KV cache view onto longserve's backend protocol, on
hand-built batches: each test fails when block tables, slot mappings, positions or layer indices are wrong."""

from __future__ import annotations

import pytest
import torch

from longserve.kernels.registry import build_backend
from longserve.vllm_plugin.adapter import PluginRuntime, SequenceIds, split_kv_cache, step_metadata

HKV, HQ, D, BS, NUM_BLOCKS = 2, 4, 32, 4, 40


def test_kv_view_splits_each_page_without_copy():
    """Each (block, head) page of vLLM's [blocks, kv_heads, block_size, 2 * head_dim] tensor holds block_size
    keys then block_size values; the views share vLLM's memory."""
    kv = torch.arange(6 * HKV * BS * 2 * D, dtype=torch.float32).view(6, HKV, BS, 2 * D)
    k_view, v_view = split_kv_cache(kv)
    assert k_view.shape == v_view.shape == (6, HKV, BS, D)
    assert k_view.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    for block, head in ((0, 0), (5, 1), (2, 1)):
        page = kv[block, head].reshape(-1)
        assert torch.equal(k_view[block, head].reshape(-1), page[: BS * D])  # one contiguous run of keys
        assert torch.equal(v_view[block, head].reshape(-1), page[BS * D:])
    k_view[2, 1, 3] = -1.0  # a write through the view lands in vLLM's tensor
    assert kv[2, 1].reshape(-1)[3 * D: 4 * D].eq(-1.0).all()
    with pytest.raises(ValueError, match="KV cache"):
        split_kv_cache(torch.zeros(6, HKV, BS, 2 * D + 1))


class Batch:
    """A vLLM-style step: three requests (a whole prompt, a decode token, a later prefill chunk) whose earlier
    keys already sit in the cache, at physical blocks in shuffled order."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.context_lens, self.query_lens = [11, 9, 14], [11, 1, 6]
        blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.block_table = torch.zeros(3, 6, dtype=torch.int32)
        self.keys, self.values, self.queries, slots = [], [], [], []
        self.kv = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D)
        k_cache, v_cache = split_kv_cache(self.kv)
        for i, (ctx, n) in enumerate(zip(self.context_lens, self.query_lens)):
            table = [blocks.pop() for _ in range(-(-ctx // BS))]
            self.block_table[i, :len(table)] = torch.tensor(table)
            k, v = torch.randn(ctx, HKV, D, generator=gen), torch.randn(ctx, HKV, D, generator=gen)
            for pos in range(ctx):
                slot = table[pos // BS] * BS + pos % BS
                if pos < ctx - n:  # written by earlier steps
                    k_cache[slot // BS, :, slot % BS], v_cache[slot // BS, :, slot % BS] = k[pos], v[pos]
                else:
                    slots.append(slot)
            self.keys.append(k)
            self.values.append(v)
            self.queries.append(torch.randn(n, HQ, D, generator=gen))
        self.slot_mapping = torch.tensor(slots + [-1, -1])  # vLLM pads past the step's tokens
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.seq_lens = torch.tensor(self.context_lens, dtype=torch.int32)

    def step_inputs(self):
        q = torch.cat(self.queries)
        k = torch.cat([k[ctx - n:] for k, ctx, n in zip(self.keys, self.context_lens, self.query_lens)])
        v = torch.cat([v[ctx - n:] for v, ctx, n in zip(self.values, self.context_lens, self.query_lens)])
        return q, k, v

    def expected(self) -> torch.Tensor:
        """Causal attention on contiguous keys: the answer whatever the paging."""
        out = []
        for q, k, v, ctx, n in zip(self.queries, self.keys, self.values, self.context_lens, self.query_lens):
            kk = k.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
            vv = v.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
            mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
            out.append(torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv,
                                                                        attn_mask=mask).transpose(0, 1))
        return torch.cat(out)


def _attend(batch: Batch, block_table=None, slot_mapping=None, seq_lens=None) -> torch.Tensor:
    runtime = PluginRuntime(build_backend("dense", 2, impl="torch"), [0, 1])
    runtime.set_step_requests(["a", "b", "c"])
    meta, state = runtime.begin_step(batch.query_start_loc, batch.seq_lens if seq_lens is None else seq_lens,
                                     batch.block_table if block_table is None else block_table,
                                     batch.slot_mapping if slot_mapping is None else slot_mapping, 3, BS)
    q, k, v = batch.step_inputs()
    return runtime.backend.forward(1, q, k, v, runtime.layer_cache(1, batch.kv), meta, state)


def test_step_metadata_fields():
    batch = Batch()
    meta = step_metadata(batch.query_start_loc, batch.seq_lens, batch.block_table, batch.slot_mapping, 3, BS,
                         [7, 8, 9])
    assert meta.positions.tolist() == list(range(11)) + [8] + list(range(8, 14))
    assert meta.context_lens_cpu == [11, 9, 14] and meta.query_lens_cpu == [11, 1, 6]
    assert meta.slot_mapping.tolist() == batch.slot_mapping[:18].tolist()  # padding dropped
    assert meta.block_tables.data_ptr() == batch.block_table.data_ptr()  # vLLM's table, not a copy
    assert meta.seq_ids == [7, 8, 9] and meta.block_size == BS


def test_attention_through_the_mapping_equals_contiguous_attention():
    batch = Batch()
    torch.testing.assert_close(_attend(batch), batch.expected(), atol=1e-5, rtol=1e-5)


def test_wrong_mapping_changes_the_answer():
    """The check above is sensitive to each input the mapping forwards."""
    expected = Batch().expected()
    swapped = Batch().block_table[[1, 0, 2]]  # rows of the wrong requests
    shifted = Batch().slot_mapping.clone()
    shifted[:18] += 1  # keys written one slot off
    longer = Batch().seq_lens + torch.tensor([0, 1, 0], dtype=torch.int32)  # positions one later
    for kwargs in ({"block_table": swapped}, {"slot_mapping": shifted}, {"seq_lens": longer}):
        assert not torch.allclose(_attend(Batch(), **kwargs), expected, atol=1e-3), kwargs


def test_sequence_ids_follow_requests():
    ids = SequenceIds()
    assert ids.for_rows(["x", "y"], 2) == [0, 1]
    assert ids.for_rows(["y", "z", None], 3) == [1, 2, -3]  # a row without a request (dummy run)
    assert ids.release(["x"]) == [0, -3]
    assert ids.for_rows(["x"], 1) == [3]  # a new request with a reused id string is a new sequence
    assert len(ids) == 3


def test_finished_requests_free_backend_state():
    freed = []

    class Recorder:
        def free_sequence(self, seq_id):
            freed.append(seq_id)

    runtime = PluginRuntime(Recorder(), [0])
    runtime.seq_ids.for_rows(["a", "b"], 2)
    runtime.finish(["b", "unknown"])
    assert freed == [1]


def test_aux_tables_follow_vllm_block_ids_per_layer():
    """HyLRA's per-block mean keys are kept beside vLLM's cache, indexed by its block ids, one table per layer."""
    batch = Batch()
    backend = build_backend("hylra", 2, {"topk_tokens": 8, "sink_blocks": 1, "recent_blocks": 1}, impl="torch")
    runtime = PluginRuntime(backend, [0, 1])
    runtime.set_step_requests(["a", "b", "c"])
    meta, state = runtime.begin_step(batch.query_start_loc, batch.seq_lens, batch.block_table, batch.slot_mapping,
                                     3, BS)
    q, k, v = batch.step_inputs()
    cache = runtime.layer_cache(1, batch.kv)
    backend.forward(1, q, k, v, cache, meta, state)
    assert cache.aux["kmean"].shape == (NUM_BLOCKS, HKV, D)
    assert runtime.layer_cache(1, batch.kv).aux["kmean"] is cache.aux["kmean"]  # kept across steps
    assert runtime.layer_cache(0, batch.kv).aux["kmean"] is not cache.aux["kmean"]  # per layer
    # Request 0 (11 keys, all written this step): its first block's mean key, at vLLM's block id.
    block = int(batch.block_table[0, 0])
    torch.testing.assert_close(cache.aux["kmean"][block], batch.keys[0][:BS].mean(0), atol=1e-5, rtol=1e-5)
    assert runtime.aux_bytes() == 2 * NUM_BLOCKS * HKV * D * 4


def test_layer_index_from_module_name():
    from longserve.vllm_plugin.backend import layer_index

    assert layer_index("model.layers.7.self_attn.attn") == 7
    assert layer_index("language_model.model.layers.0.self_attn.attn") == 0


def test_impl_routes_its_layer_and_leaves_padding():
    """The impl hands the backend its own layer index and only the step's tokens; padding rows stay as they were."""
    from longserve.vllm_plugin.backend import LongserveAttentionImpl, LongserveMetadata

    seen = []

    class Recorder:
        def forward(self, layer_idx, q, k, v, cache, meta, state):
            seen.append((layer_idx, q.shape[0], cache.k.shape))
            return torch.full_like(q, float(layer_idx))

    batch = Batch()
    runtime = PluginRuntime(Recorder(), [3])
    runtime._allocate_aux = lambda layer_idx, k: {}
    runtime.set_step_requests(["a", "b", "c"])
    meta, state = runtime.begin_step(batch.query_start_loc, batch.seq_lens, batch.block_table, batch.slot_mapping,
                                     3, BS)
    impl = LongserveAttentionImpl(HQ, D, D ** -0.5, HKV)
    impl.layer_idx = 3
    q, k, v = batch.step_inputs()
    pad = lambda t: torch.cat([t, torch.zeros(2, *t.shape[1:])])  # noqa: E731
    output = torch.full((20, HQ, D), -1.0)
    impl.forward(None, pad(q), pad(k), pad(v), batch.kv, LongserveMetadata(meta, state, runtime), output)
    assert seen == [(3, 18, (NUM_BLOCKS, HKV, BS, D))]
    assert output[:18].eq(3.0).all() and output[18:].eq(-1.0).all()


@pytest.mark.parametrize("kwargs, problem", [
    ({"sliding_window": 128}, "sliding-window"),
    ({"logits_soft_cap": 30.0}, "soft-capping"),
    ({"scale": 0.5}, "softmax scale"),
])
def test_impl_refuses_what_it_cannot_run(kwargs, problem):
    from longserve.vllm_plugin.backend import LongserveAttentionImpl

    args = {"num_heads": HQ, "head_size": D, "scale": D ** -0.5, "num_kv_heads": HKV, **kwargs}
    with pytest.raises(ValueError, match=problem):
        LongserveAttentionImpl(**args)
