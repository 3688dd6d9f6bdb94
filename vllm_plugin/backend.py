"""longserve's attention as vLLM's CUSTOM attention backend (vLLM 0.32).

vLLM builds one metadata object per step and KV cache group (LongserveMetadataBuilder.build) and calls the
layer's impl (LongserveAttentionImpl.forward) once per attention layer with its cache view. The builder maps
vLLM's metadata onto longserve's AttentionMetadata and opens a fresh StepState, which every layer of the
forward pass shares (HyLRA / routing reuse layers read their source layer's selection from it). The impl
routes the layer to the plan's method through kernels.registry's PlannedBackend; attention runs eagerly
(CUDA graphs: vLLM's piecewise graphs leave attention outside; full graphs are declared unsupported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)
from vllm.v1.kv_cache_layout import KVCacheLayout

from ..kernels.base import AttentionMetadata, BackendSetup, StepState
from .adapter import PluginRuntime
from .config import SECTION, build_from_section, check_local_layers


def model_info(vllm_config: VllmConfig) -> dict:
    """The whole model's attention shape (before tensor/pipeline sharding), as policies record it."""
    mc = vllm_config.model_config
    return {"architecture": mc.architecture, "num_layers": mc.get_total_num_hidden_layers(),
            "num_heads": mc.hf_text_config.num_attention_heads, "num_kv_heads": mc.get_total_num_kv_heads(),
            "head_dim": mc.get_head_size()}


def worker_setup(vllm_config: VllmConfig, device: torch.device) -> BackendSetup:
    """What each worker will run, as the main process can tell before any worker starts: tensor parallelism
    gives each rank num_heads / tp query heads and max(1, num_kv_heads / tp) KV heads."""
    info, tp = model_info(vllm_config), vllm_config.parallel_config.tensor_parallel_size
    return BackendSetup(info["num_heads"] // tp, max(1, info["num_kv_heads"] // tp), info["head_dim"],
                        vllm_config.cache_config.block_size, vllm_config.model_config.dtype, device)


def layer_index(layer_name: str) -> int:
    """The model layer an attention module sits in ("model.layers.7.self_attn.attn" -> 7): the plan's index."""
    return extract_layer_index(layer_name)


class LongserveAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True  # each method writes K/V (and its aux tables) itself
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["LongserveAttentionImpl"]:
        return LongserveAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LongserveMetadataBuilder"]:
        return LongserveMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # [blocks, kv_heads, block_size, 2 * head_dim] per layer: head-major inside a block, as longserve's cache.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class LongserveMetadata:
    meta: AttentionMetadata
    state: StepState
    runtime: PluginRuntime


class LongserveMetadataBuilder(AttentionMetadataBuilder[LongserveMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        indices = {name: layer_index(name) for name in layers}
        impl = next(iter(layers.values())).impl
        setup = BackendSetup(impl.num_heads, impl.num_kv_heads, impl.head_size, kv_cache_spec.block_size,
                             kv_cache_spec.dtype, torch.device(device))
        # Checked again here: this is what the worker itself runs (its heads, its pipeline stage's layers).
        extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
        backend = build_from_section(extra.get(SECTION), model_info(vllm_config), setup)
        check_local_layers(backend.plan, list(indices.values()))
        # One runtime per group of layers that share this metadata (normally the whole model on this worker).
        self.runtime = PluginRuntime(backend, list(indices.values()))
        for name, layer in layers.items():
            layer.impl.layer_idx = indices[name]
            layer.impl.runtime = self.runtime

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LongserveMetadata:
        c = common_attn_metadata
        seq_lens_cpu = c.seq_lens_cpu_upper_bound if c.seq_lens_cpu_upper_bound is not None else c.seq_lens.cpu()
        meta, state = self.runtime.begin_step(c.query_start_loc_cpu, seq_lens_cpu, c.block_table_tensor,
                                              c.slot_mapping, c.num_reqs, self.kv_cache_spec.block_size)
        return LongserveMetadata(meta, state, self.runtime)


class LongserveAttentionImpl(AttentionImpl[LongserveMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        # num_heads / num_kv_heads are this tensor-parallel rank's share: each rank attends its own heads.
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.layer_idx: int | None = None  # set by the metadata builder (from the layer's module name)
        self.runtime: PluginRuntime | None = None
        unsupported = [
            (alibi_slopes is not None, "ALiBi"), (sliding_window is not None, "sliding-window attention"),
            (bool(logits_soft_cap), "logit soft-capping"), (attn_type != AttentionType.DECODER, f"{attn_type} attention"),
            (kv_sharing_target_layer_name is not None, "cross-layer KV sharing"), (sinks is not None, "attention sinks"),
            (kv_cache_dtype != "auto", f"kv_cache_dtype {kv_cache_dtype}"),
            (abs(self.scale - head_size ** -0.5) > 1e-6 * head_size ** -0.5, f"softmax scale {scale} (not 1/sqrt(head_dim))"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ValueError(f"longserve: the CUSTOM attention backend does not support {what}")

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: LongserveMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("longserve: fused output quantization is not supported")
        if attn_metadata is None:  # vLLM's profiling runs: no cache yet
            return output
        meta = attn_metadata.meta
        n = meta.num_tokens  # rows past n are vLLM's padding
        cache = attn_metadata.runtime.layer_cache(self.layer_idx, kv_cache)
        out = attn_metadata.runtime.backend.forward(self.layer_idx, query[:n], key[:n], value[:n], cache, meta,
                                                    attn_metadata.state)
        output[:n] = out.reshape(output[:n].shape).to(output.dtype)
        return output
