"""vLLM's per-step metadata and per-layer KV cache view, mapped onto kernels/base.py's protocol.

Nothing here imports vLLM, so the mapping is tested on hand-built tensors (tests_vllm/test_mapping.py).

KV cache: vLLM hands each layer one tensor of logical shape [num_blocks, num_kv_heads, block_size, 2 * head_dim]
(layout LBHNC, which the backend declares). As vLLM's own CPU attention does, each (block, head) page is read as
[K: block_size x head_dim | V: block_size x head_dim], so split_kv_cache returns two strided views with
longserve's shape [num_blocks, num_kv_heads, block_size, head_dim]: one head's block stays one contiguous run,
and nothing is copied.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..kernels.base import AttentionMetadata, BackendError, LayerCache, StepState

logger = logging.getLogger("vllm.longserve")  # under vLLM's logger, so its handler prints it


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views [num_blocks, Hkv, block_size, D] of vLLM's [num_blocks, Hkv, block_size, 2 * D] layer cache."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] % 2:
        raise BackendError(f"longserve: expected a [blocks, kv_heads, block_size, 2 * head_dim] KV cache, "
                           f"got {tuple(kv_cache.shape)}")
    num_blocks, heads, block_size, content = kv_cache.shape
    pages = kv_cache.view(num_blocks, heads, 2 * block_size, content // 2)
    return pages[:, :, :block_size], pages[:, :, block_size:]


def step_metadata(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, block_table: torch.Tensor,
                  slot_mapping: torch.Tensor, num_reqs: int, block_size: int, seq_ids: Sequence[int]
                  ) -> AttentionMetadata:
    """longserve's AttentionMetadata for one vLLM step.

    vLLM gives, per request row i < num_reqs: query_start_loc[i] (offset of its tokens in the step), seq_lens[i]
    (keys after this step's write: longserve's context_len), its block table row and, per token, the slot to
    write. Each request's step tokens are the last query_len of its context, so positions follow from those.
    Not AttentionMetadata.for_step: that one derives the slots itself and copies the tables through the host;
    here vLLM's own block table and slot mapping are used as they are (no copy, no device sync)."""
    starts = query_start_loc_cpu[: num_reqs + 1].tolist()
    context_lens = [int(n) for n in seq_lens_cpu[:num_reqs].tolist()]
    query_lens = [b - a for a, b in zip(starts, starts[1:])]
    num_tokens = starts[-1] - starts[0] if starts else 0
    if starts and starts[0] != 0:
        raise BackendError("longserve: the step's query offsets must start at 0")
    positions = []
    for ctx, n in zip(context_lens, query_lens):
        if n > ctx:
            raise BackendError(f"longserve: a request has {n} step tokens but only {ctx} keys")
        positions.extend(range(ctx - n, ctx))
    device = block_table.device
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=slot_mapping[:num_tokens].long(),
        block_tables=block_table[:num_reqs],
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        block_size=block_size,
        context_lens_cpu=context_lens,
        query_lens_cpu=query_lens,
        seq_ids=list(seq_ids),
    )


class SequenceIds:
    """Stable integer sequence ids for vLLM's string request ids (backends keep per-sequence state by id).

    Rows without a request (vLLM's dummy runs) get negative ids, dropped at the next step."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._next = 0
        self._dummies: list[int] = []

    def for_rows(self, req_ids: Sequence[str | None], num_rows: int) -> list[int]:
        out = []
        for row in range(num_rows):
            rid = req_ids[row] if row < len(req_ids) else None
            if rid is None:
                out.append(-1 - row)
                self._dummies.append(-1 - row)
                continue
            if rid not in self._ids:
                self._ids[rid] = self._next
                self._next += 1
            out.append(self._ids[rid])
        return out

    def release(self, req_ids: Sequence[str]) -> list[int]:
        """Ids of finished requests plus the dummy rows of earlier steps; forgotten from here on."""
        out = [self._ids.pop(rid) for rid in req_ids if rid in self._ids] + sorted(set(self._dummies))
        self._dummies.clear()
        return out

    def __len__(self) -> int:
        return len(self._ids)


class PluginRuntime:
    """One model's longserve state in one vLLM worker: the backend, sequence ids and per-layer aux tables.

    The aux tables (e.g. HyLRA's mean key per block and head) sit beside vLLM's cache, indexed by the same
    block ids; vLLM does not count them in its KV budget, so their size is logged when they are allocated."""

    def __init__(self, backend: Any, layer_indices: Sequence[int]):
        self.backend = backend
        self.layer_indices = sorted(layer_indices)
        self.seq_ids = SequenceIds()
        self._aux: dict[int, dict[str, torch.Tensor]] = {}
        self._request_ids: list[str | None] = []

    # -- requests --------------------------------------------------------------------------------------------
    def set_step_requests(self, req_ids: Sequence[str | None]) -> None:
        """The request id of each batch row of the coming step (vLLM's input batch order)."""
        self._request_ids = list(req_ids)

    def finish(self, req_ids: Sequence[str]) -> None:
        for seq_id in self.seq_ids.release(req_ids):
            self.backend.free_sequence(seq_id)

    def begin_step(self, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, block_table: torch.Tensor,
                   slot_mapping: torch.Tensor, num_reqs: int, block_size: int) -> tuple[AttentionMetadata, StepState]:
        """The step's metadata and a fresh StepState (HyLRA/routing reuse layers read their sources' selections
        from it within this forward pass)."""
        self.finish([])  # drop the state of dummy rows from earlier steps
        ids = self.seq_ids.for_rows(self._request_ids, num_reqs)
        meta = step_metadata(query_start_loc_cpu, seq_lens_cpu, block_table, slot_mapping, num_reqs, block_size, ids)
        return meta, StepState()

    # -- caches ----------------------------------------------------------------------------------------------
    def layer_cache(self, layer_idx: int, kv_cache: torch.Tensor) -> LayerCache:
        k, v = split_kv_cache(kv_cache)
        aux = self._aux.get(layer_idx)
        if aux is None or any(t.shape[0] != k.shape[0] or t.device != k.device for t in aux.values()):
            aux = self._allocate_aux(layer_idx, k)
        return LayerCache(k, v, aux)

    def _allocate_aux(self, layer_idx: int, k: torch.Tensor) -> dict[str, torch.Tensor]:
        specs = self.backend.aux_specs(k.shape[1], k.shape[3])
        aux = {name: torch.zeros((k.shape[0], *shape), dtype=dtype or k.dtype, device=k.device)
               for name, (shape, dtype) in specs.items()}
        first = not self._aux
        self._aux[layer_idx] = aux
        if aux and first:
            per_layer = sum(t.numel() * t.element_size() for t in aux.values())
            logger.info("longserve: per-block aux tables %s beside vLLM's KV cache: %.2f MiB per layer, %.2f MiB for "
                        "the %d attention layers of this worker (not counted in vLLM's KV cache budget)",
                        ", ".join(f"{n} {list(t.shape)} {str(t.dtype).replace('torch.', '')}" for n, t in aux.items()),
                        per_layer / 2**20, per_layer * len(self.layer_indices) / 2**20, len(self.layer_indices))
        return aux

    def aux_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tables in self._aux.values() for t in tables.values())
