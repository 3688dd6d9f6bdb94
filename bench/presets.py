"""Model shape presets for benchmarks: real architectures' shapes with random weights, so throughput at long
context can be measured without downloading a checkpoint (speed depends on the shapes, not on the weights).

Each preset is a Hugging Face config.json dict, parsed by the same ModelConfig.from_dict as a checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..engine.models.decoder import DecoderModel, ModelConfig

PRESETS: dict[str, dict] = {
    # CPU-sized: two layers, GQA 4:1, head_dim 32. KV cache in float32 is 512 bytes per token (512 MiB at 1M
    # tokens), so dense and every sparse method decode at 1M context on a 2-core CI machine in a few minutes.
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 2048, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 1 << 25, "tie_word_embeddings": True, "eos_token_id": 1, "bos_token_id": 0,
    },
    # Qwen/Qwen2.5-7B-Instruct-1M (config.json): 28 layers, 28 query / 4 KV heads of 128, bias on q/k/v.
    "qwen2.5-7b-1m": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "rms_norm_eps": 1e-5, "rope_theta": 10_000_000.0,
        "max_position_embeddings": 1_010_000, "tie_word_embeddings": False, "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    # meta-llama/Llama-3.1-8B (config.json): 32 layers, 32 query / 8 KV heads of 128, llama3 RoPE scaling.
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500_000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "eos_token_id": 128001,
        "bos_token_id": 128000, "torch_dtype": "bfloat16",
    },
}


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a preset (optionally with fewer or more layers)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = copy.deepcopy(PRESETS[name])
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    return ModelConfig.from_dict(cfg)


def with_num_layers(config: ModelConfig, num_layers: int | None) -> ModelConfig:
    return config if num_layers is None else replace(config, num_layers=num_layers)


def weight_count(c: ModelConfig) -> int:
    """Number of parameters of DecoderModel(c) (computed from the shapes, nothing allocated)."""
    qkv = c.q_size + 2 * c.kv_size
    per_layer = (2 * c.hidden_size  # the two RMSNorms
                 + c.hidden_size * qkv + (qkv if c.attention_bias else 0)
                 + c.q_size * c.hidden_size + (c.hidden_size if c.o_proj_bias else 0)
                 + (2 * c.head_dim if c.qk_norm else 0)
                 + 3 * c.hidden_size * c.intermediate_size
                 + ((2 * c.intermediate_size + c.hidden_size) if c.mlp_bias else 0))
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.hidden_size + c.num_layers * per_layer


@torch.no_grad()
def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DecoderModel:
    """DecoderModel with random weights of a realistic scale (normal(0, 0.02) matrices, unit norms, zero biases),
    so activations stay finite over many layers."""
    model = DecoderModel(config, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model.eval()
