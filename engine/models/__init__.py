"""Model implementations: one decoder for Llama / Mistral / Qwen2 / Qwen3 checkpoints, and RoPE."""

from .decoder import SUPPORTED_ARCHITECTURES, DecoderModel, ModelConfig
from .rope import RopeConfig, RotaryEmbedding, apply_rope, parse_rope_config

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderModel", "ModelConfig", "RopeConfig", "RotaryEmbedding", "apply_rope",
           "parse_rope_config"]
