"""The `prefill` parameter every sparse method takes: how prompt chunks attend.

  "sparse"  every step token attends to what the method selects (prompt chunks and decode tokens alike)
  "dense"   tokens of a sequence whose step brings more than one token (a prompt chunk) attend densely over
            the paged cache; decode tokens (one token per sequence) attend sparsely. The cache write and the
            method's per-block tables are updated for every written block either way, so decoding after a
            dense prefill sees the same tables as after a sparse one.

Dense prefill is how training-free sparse methods are usually deployed: the prompt's hidden states (and so
every later layer's keys) are those of the model, and only decoding, which reads the whole context per token,
is sparse.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import AttentionMetadata, BackendError

PREFILL_MODES = ("sparse", "dense")

Attend = Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]


def check_prefill(method: str, value: object) -> str:
    if value not in PREFILL_MODES:
        raise BackendError(f"{method}: prefill must be 'sparse' or 'dense', got {value!r}")
    return value  # type: ignore[return-value]


def sequence_subset(meta: AttentionMetadata, seqs: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """The metadata of some of a step's sequences (in the given order) and the indices of their tokens in
    the step's flattened token axis."""
    starts = [sum(meta.query_lens_cpu[:i]) for i in range(meta.num_seqs)]
    device = meta.positions.device
    tokens = torch.cat([torch.arange(starts[i], starts[i] + meta.query_lens_cpu[i]) for i in seqs]).to(device)
    rows = torch.tensor(seqs, dtype=torch.long, device=device)
    qlens = [meta.query_lens_cpu[i] for i in seqs]
    qsl = torch.tensor([0] + qlens, dtype=torch.int64).cumsum(0).to(dtype=meta.query_start_loc.dtype, device=device)
    sub = AttentionMetadata(
        positions=meta.positions[tokens], slot_mapping=meta.slot_mapping[tokens],
        block_tables=meta.block_tables[rows], context_lens=meta.context_lens[rows], query_start_loc=qsl,
        block_size=meta.block_size, context_lens_cpu=[meta.context_lens_cpu[i] for i in seqs],
        query_lens_cpu=qlens, seq_ids=[meta.seq_ids[i] for i in seqs] if meta.seq_ids else [])
    return sub, tokens


def attend_by_prefill_mode(mode: str, q: torch.Tensor, meta: AttentionMetadata, sparse: Attend,
                           dense: Attend) -> torch.Tensor:
    """[T, Hq, D]: `sparse(q, meta)` for every token, or with mode "dense" `dense` for the tokens of
    sequences with more than one step token and `sparse` for the others (each called on its own subset)."""
    if mode == "sparse" or meta.max_query_len <= 1:
        return sparse(q, meta)
    prompt = [i for i, n in enumerate(meta.query_lens_cpu) if n > 1]
    if len(prompt) == meta.num_seqs:
        return dense(q, meta)
    decode = [i for i, n in enumerate(meta.query_lens_cpu) if n <= 1]
    out = torch.empty_like(q)
    for seqs, attend in ((prompt, dense), (decode, sparse)):
        sub, tokens = sequence_subset(meta, seqs)
        out[tokens] = attend(q[tokens], sub).to(out.dtype)
    return out
