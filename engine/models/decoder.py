"""One pre-norm decoder for Llama, Mistral, Qwen2 and Qwen3 checkpoints (plain torch, no transformers at run time).

The four families differ only in details, all read from config.json:
  Llama    optional bias on q/k/v/o (attention_bias) and on the MLP (mlp_bias)
  Mistral  no biases; a sliding window (older checkpoints) is handled by capping the context length
  Qwen2    bias on q/k/v, none on o
  Qwen3    RMSNorm over each head's q and k (before RoPE); optional bias on q/k/v/o
All use GQA, SwiGLU, RMSNorm and rotate_half RoPE. Projections are fused at load time (q|k|v and gate|up) so a
layer runs four matmuls.

Attention itself is not here: each layer hands q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) to the engine's
attention backend, which writes the paged KV cache and attends.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .rope import RopeConfig, RotaryEmbedding, apply_rope, parse_rope_config

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool  # bias on q/k/v
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype name ("bfloat16", ...), None if unstated
    # The checkpoint's sliding window, if any. The engine attends to the full context, which equals sliding-window
    # attention only up to the window, so max_position_embeddings is capped at it.
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict, generation_config: dict | None = None) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            found = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r} without 'architectures'"
            raise ModelLoadError(f"unsupported architecture {found} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def req(key: str):
            if cfg.get(key) is None:
                raise ModelLoadError(f"config.json has no '{key}' (needed for {arch})")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"hidden_act={act!r} is not supported (expected silu)")
        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ModelLoadError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if head_dim % 2:
            raise ModelLoadError(f"head_dim={head_dim} must be even for RoPE")
        family = arch.removesuffix("ForCausalLM")
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias = {"Llama": (bias, bias), "Mistral": (False, False), "Qwen2": (True, False),
                            "Qwen3": (bias, bias)}[family]
        max_pos = int(cfg.get("max_position_embeddings") or {"Mistral": 131072, "Qwen2": 32768, "Qwen3": 32768}.get(
            family, 2048))
        window = None
        if family == "Mistral":
            window = cfg.get("sliding_window", 4096)  # transformers' MistralConfig default
        elif family in ("Qwen2", "Qwen3") and cfg.get("use_sliding_window"):
            layer_types = cfg.get("layer_types")
            sliding_layers = ("sliding_attention" in layer_types) if layer_types else \
                int(cfg.get("max_window_layers", 28)) < int(req("num_hidden_layers"))
            window = cfg.get("sliding_window") if sliding_layers else None
        rope = parse_rope_config(cfg, head_dim)
        if window is not None and int(window) < max_pos:
            logger.warning("checkpoint uses a %d-token sliding window; capping the context at %d tokens "
                           "(full attention equals it up to there)", window, window)
            max_pos = int(window)
        eos = _id_list(cfg.get("eos_token_id")) + _id_list((generation_config or {}).get("eos_token_id"))
        return cls(
            architecture=arch,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            num_layers=int(req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(req("intermediate_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=family == "Llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "Qwen3",
            eos_token_ids=list(dict.fromkeys(eos)),
            bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            sliding_window=int(window) if window is not None else None,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Parse <path>/config.json (and generation_config.json's eos ids when present)."""
        path = Path(path)
        cfg = _read_json(path / "config.json")
        gen = path / "generation_config.json"
        return cls.from_dict(cfg, _read_json(gen) if gen.is_file() else None)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def fingerprint(self) -> str:
        """Short hash of the fields that fix the weight shapes and the attention layout."""
        shape = {k: getattr(self, k) for k in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "num_kv_heads", "head_dim", "intermediate_size", "qk_norm",
                                               "attention_bias", "tie_word_embeddings")}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]

    def model_info(self) -> dict:
        """What attention policies are checked against (kernels.plan.AttentionPlan.check_model)."""
        return {"architecture": self.architecture, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "fingerprint": self.fingerprint()}

    def to_dict(self) -> dict:
        return asdict(self)


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


# -- modules ------------------------------------------------------------------------------------------------------
# Parameters are created with torch.empty: every value comes from the checkpoint, so random init would be wasted.

class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: normalise in float32, cast back, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.intermediate_size = c.intermediate_size
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, c.attention_bias, **kw)
        self.o_proj = Linear(c.q_size, c.hidden_size, c.o_proj_bias, **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw) if c.qk_norm else None
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, c.mlp_bias, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, **kw)

    def forward(self, x, cos, sin, cache, meta, backend, state) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = backend.forward(self.layer_idx, q, k, v, cache, meta, state)
        x = x + self.o_proj(attn.reshape(t, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).split(self.intermediate_size, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class DecoderModel(nn.Module):
    """forward(input_ids [T], positions [T], caches, meta, backend, state) -> final-normed hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> [N, vocab] float32."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = c = config
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size, **kw), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(c, i, **kw) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size, **kw), requires_grad=False)
        self.rotary = RotaryEmbedding(c.rope)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list, meta, backend,
                state) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        seq_lens = None
        if self.config.rope.rope_type == "dynamic" and meta is not None and meta.query_lens_cpu:
            # dynamic NTK: each token uses its own sequence's length in this step (as transformers does for
            # a single sequence), so batching never changes a sequence's result.
            seq_lens = torch.repeat_interleave(torch.tensor(meta.context_lens_cpu, dtype=torch.int64),
                                               torch.tensor(meta.query_lens_cpu, dtype=torch.int64))
        cos, sin = self.rotary.cos_sin(positions, seq_lens)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, meta, backend, state)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()

    # -- weights --------------------------------------------------------------------------------------------------
    def checkpoint_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hugging Face checkpoint of this config must hold, with its shape."""
        c = self.config
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                              "model.norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
            shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
            for name, out in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
                shapes[f"{p}self_attn.{name}.weight"] = (out, c.hidden_size)
                if c.attention_bias:
                    shapes[f"{p}self_attn.{name}.bias"] = (out,)
            shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
            if c.o_proj_bias:
                shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
            if c.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
            for name, shape in (("gate_proj", (c.intermediate_size, c.hidden_size)),
                                ("up_proj", (c.intermediate_size, c.hidden_size)),
                                ("down_proj", (c.hidden_size, c.intermediate_size))):
                shapes[f"{p}mlp.{name}.weight"] = shape
                if c.mlp_bias:
                    shapes[f"{p}mlp.{name}.bias"] = shape[:1]
        return shapes

    def _target(self, name: str) -> torch.Tensor:
        """The (slice of the) parameter a checkpoint tensor is copied into."""
        c = self.config
        if name == "model.embed_tokens.weight":
            return self.embed_tokens
        if name == "model.norm.weight":
            return self.norm.weight
        if name == "lm_head.weight":
            return self.lm_head
        parts = name.split(".")  # model.layers.{i}.{self_attn|mlp|...}.{proj}.{weight|bias}
        layer = self.layers[int(parts[2])]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        fused = {"self_attn.q_proj": (layer.qkv_proj, 0, c.q_size),
                 "self_attn.k_proj": (layer.qkv_proj, c.q_size, c.kv_size),
                 "self_attn.v_proj": (layer.qkv_proj, c.q_size + c.kv_size, c.kv_size),
                 "mlp.gate_proj": (layer.gate_up_proj, 0, c.intermediate_size),
                 "mlp.up_proj": (layer.gate_up_proj, c.intermediate_size, c.intermediate_size)}
        if module in fused:
            target, start, size = fused[module]
            return getattr(target, kind).narrow(0, start, size)
        plain = {"self_attn.o_proj": layer.o_proj, "self_attn.q_norm": layer.q_norm,
                 "self_attn.k_norm": layer.k_norm, "mlp.down_proj": layer.down_proj,
                 "input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}
        return getattr(plain[module], kind)

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the model; return the names loaded.

        Tensors the architecture does not use (rotary inv_freq buffers, lm_head of a tied model) are skipped;
        any other unknown name or a wrong shape raises ModelLoadError. The caller checks for missing names."""
        expected = self.checkpoint_tensor_shapes()
        loaded: set[str] = set()
        for name, tensor in tensors:
            if name not in expected:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
                    continue
                raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (not part of a "
                                     f"{self.config.architecture} with this config.json)")
            if tuple(tensor.shape) != expected[name]:
                raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                                     f"{expected[name]}")
            self._target(name).copy_(tensor)
            loaded.add(name)
        return loaded

    def missing_tensors(self, loaded: set[str]) -> list[str]:
        return [n for n in self.checkpoint_tensor_shapes() if n not in loaded]
