"""The attention backend protocol shared by every method.

Shapes (T = tokens in the step, S = sequences in the step):
  q            [T, Hq, D]        queries of the step's tokens, flattened over sequences (RoPE applied)
  k, v         [T, Hkv, D]       the step's new keys/values (written into the cache by the backend)
  k_cache      [num_blocks, Hkv, block_size, D]   head-major inside a block: one head's block is one
  v_cache      [num_blocks, Hkv, block_size, D]   contiguous run of memory (good for span/block gathers)
  output       [T, Hq, D]

Each sequence's tokens in the step are contiguous in q (query_start_loc) and are the LAST query_len tokens
of its context: after the cache write the sequence has context_len keys, and its i-th step token sits at
absolute position context_len - query_len + i (causal: it sees keys 0 .. that position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch


@dataclass
class AttentionMetadata:
    """Everything a backend needs to locate a step's tokens in the paged cache."""

    positions: torch.Tensor  # [T] int64, absolute position of each step token
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset where the token's K/V go
    block_tables: torch.Tensor  # [S, max_blocks] int32, physical block ids (padding: 0)
    context_lens: torch.Tensor  # [S] int32, keys visible to the sequence after this step's write
    query_start_loc: torch.Tensor  # [S + 1] int32, offsets of each sequence's tokens in q
    block_size: int
    # Host copies, so reference paths and planners never synchronise with the device.
    context_lens_cpu: list[int] = field(default_factory=list)
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)  # engine sequence ids (for per-sequence state)

    @classmethod
    def for_step(cls, block_tables: Sequence[Any], context_lens: Sequence[int], query_lens: Sequence[int],
                 block_size: int, device: torch.device | str = "cpu", seq_ids: Sequence[int] | None = None
                 ) -> "AttentionMetadata":
        """The metadata of a step in which sequence i computes the last query_lens[i] of its context_lens[i]
        tokens (positions context - query .. context - 1), whose keys and values go to the slots of its block
        table (block_tables[i]: physical block ids, a list or a tensor; rows may be padded). The one builder,
        shared by the model runner, the test helpers, the profiler and the kernels' tests."""
        ctx = [int(c) for c in context_lens]
        qlens = [int(n) for n in query_lens]
        if not len(block_tables) == len(ctx) == len(qlens):
            raise ValueError(f"{len(block_tables)} block tables, {len(ctx)} context lengths and {len(qlens)} "
                             "query lengths: give one of each per sequence")
        rows = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu() for t in block_tables]
        tables = torch.zeros((len(rows), max((r.numel() for r in rows), default=0)), dtype=torch.int32)
        positions, slots = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
        for i, (row, c, n) in enumerate(zip(rows, ctx, qlens)):
            if not 0 <= n <= c or -(-c // block_size) > row.numel():
                raise ValueError(f"sequence {i}: {n} new of {c} tokens do not fit its {row.numel()} blocks of "
                                 f"{block_size}")
            tables[i, :row.numel()] = row
            pos = torch.arange(c - n, c)
            positions.append(pos)
            slots.append(row[pos // block_size] * block_size + pos % block_size)
        starts = torch.zeros(len(qlens) + 1, dtype=torch.int32)
        starts[1:] = torch.tensor(qlens, dtype=torch.int64).cumsum(0)
        return cls(positions=torch.cat(positions).to(device), slot_mapping=torch.cat(slots).to(device),
                   block_tables=tables.to(device), context_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
                   query_start_loc=starts.to(device), block_size=block_size, context_lens_cpu=ctx,
                   query_lens_cpu=qlens, seq_ids=list(range(len(ctx))) if seq_ids is None else list(seq_ids))

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_cpu, default=0)

    @property
    def is_pure_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens_cpu)

    def query_slice(self, i: int) -> slice:
        start = sum(self.query_lens_cpu[:i])
        return slice(start, start + self.query_lens_cpu[i])


@dataclass
class LayerCache:
    """One attention layer's paged K/V plus the per-block auxiliary tables its backend keeps.

    aux tables are indexed by the same physical block ids as k/v (e.g. aux["kmin"]: [num_blocks, Hkv, D]),
    so a sparse backend can score blocks without re-reading every key.
    """

    k: torch.Tensor
    v: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]


@dataclass
class StepState:
    """What one layer hands to later layers within a single forward pass.

    selections[layer] is whatever the layer's backend selected (e.g. HyLRA's top-k block ids); a REUSE
    layer reads selections[source]. Created fresh for every forward pass.
    """

    selections: dict[int, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendSetup:
    """What the engine knows once the model is loaded and before anything runs: each backend checks it
    (`check`) so that a setting it cannot serve fails at start-up, never inside a step."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device


class AttentionBackend(Protocol):
    """One attention method. The engine owns one backend per step; the plan says which layer runs what."""

    name: str

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-block auxiliary tables this backend wants beside each layer's cache.

        Maps a name to (shape after the leading num_blocks dim, dtype or None for the cache dtype).
        The engine allocates them with the cache and counts them in the KV memory budget.
        """
        ...

    def check(self, setup: BackendSetup) -> None:
        """Raise BackendError (one line) for a model shape, block size, dtype, device or implementation this
        backend cannot run; called once when the engine is built."""
        ...

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        meta: AttentionMetadata,
        state: StepState,
    ) -> torch.Tensor:
        """Write k/v into the cache (and update aux tables), attend, return [T, Hq, D]."""
        ...

    def free_sequence(self, seq_id: int) -> None:
        """Drop any per-sequence state (called when a sequence finishes, aborts or is preempted)."""
        ...


class BackendError(ValueError):
    """Bad backend parameters or plan (a user error: reported in one line)."""
