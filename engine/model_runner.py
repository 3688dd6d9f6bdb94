"""Model runner: owns the model, the paged KV cache and the attention backend; runs one step's batch."""

from __future__ import annotations

import math

import torch

from ..kernels.base import AttentionMetadata, LayerCache, StepState
from .errors import EngineError
from .scheduler import ScheduledSeq

_CPU_DEFAULT_KV_GB = 2.0


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model, model_config, backend, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_kv_blocks: int | None = None, kv_cache_memory_gb: float | None = None,
                 gpu_memory_utilization: float = 0.9):
        self.model = model
        self.config = model_config
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.aux_specs = backend.aux_specs(model_config.num_kv_heads, model_config.head_dim)
        if num_kv_blocks is None:
            num_kv_blocks = self._blocks_from_memory(kv_cache_memory_gb, gpu_memory_utilization)
        self.num_kv_blocks = num_kv_blocks
        self.caches = self._allocate(num_kv_blocks)

    # -- KV cache sizing and allocation ----------------------------------------------------------------
    def bytes_per_block(self) -> int:
        c = self.config
        kv = 2 * c.num_kv_heads * self.block_size * c.head_dim * dtype_size(self.dtype)
        aux = sum(math.prod(shape) * dtype_size(dt or self.dtype) for shape, dt in self.aux_specs.values())
        return c.num_layers * (kv + aux)

    def _blocks_from_memory(self, kv_gb: float | None, utilization: float) -> int:
        per_block = self.bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free  # weights (already loaded) and anything else on the card
            reserve = 1 << 30  # activations of one step and workspace
            budget = total * utilization - used_by_others - reserve
            if kv_gb is not None:
                budget = min(budget, kv_gb * (1 << 30))
        else:
            budget = (kv_gb if kv_gb is not None else _CPU_DEFAULT_KV_GB) * (1 << 30)
        blocks = int(budget // per_block)
        if blocks < 2:
            raise EngineError(
                f"not enough memory for the KV cache: {budget / 2**30:.2f} GiB available, one block of "
                f"{self.block_size} tokens needs {per_block / 2**20:.2f} MiB (lower the model size or raise "
                "--kv-cache-memory-gb / --gpu-memory-utilization)")
        return blocks

    def _allocate(self, num_blocks: int) -> list[LayerCache]:
        c = self.config
        shape = (num_blocks, c.num_kv_heads, self.block_size, c.head_dim)
        caches = []
        for _ in range(c.num_layers):
            aux = {name: torch.zeros((num_blocks, *s), dtype=dt or self.dtype, device=self.device)
                   for name, (s, dt) in self.aux_specs.items()}
            caches.append(LayerCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                                     torch.zeros(shape, dtype=self.dtype, device=self.device), aux))
        return caches

    # -- one step -----------------------------------------------------------------------------------------
    def build_batch(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the step's tokens; return input ids, metadata and the row of each sampled sequence."""
        input_ids: list[int] = []
        sample_rows = []
        for item in scheduled:
            start = item.seq.num_computed_tokens
            input_ids.extend(item.seq.token_ids[start:start + item.num_tokens])
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata.for_step(
            [item.seq.block_table for item in scheduled],
            [item.seq.num_computed_tokens + item.num_tokens for item in scheduled],
            [item.num_tokens for item in scheduled], self.block_size, self.device,
            [item.seq.seq_id for item in scheduled])
        return torch.tensor(input_ids, dtype=torch.long, device=self.device), meta, sample_rows

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Run the model over the step; return float32 logits of the sampled rows (in scheduled order)."""
        input_ids, meta, sample_rows = self.build_batch(scheduled)
        hidden = self.model(input_ids, meta.positions, self.caches, meta, self.backend, StepState())
        if not sample_rows:
            return torch.empty((0, self.config.vocab_size), dtype=torch.float32, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows]).float()
