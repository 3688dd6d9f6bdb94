"""Rotary position embeddings (the "rotate_half" layout Llama, Mistral and Qwen use) with long-context scaling.

Supported scaling types, numerically as transformers computes them (modeling_rope_utils):
  default  inv_freq = 1 / theta^(2i/d)
  linear   inv_freq / factor (position interpolation)
  dynamic  NTK-aware: theta grows with the sequence length once it passes max_position_embeddings
  llama3   Llama 3.1: low frequencies divided by factor, high ones kept, a smooth ramp between
  yarn     NTK-by-parts ramp between interpolation and extrapolation, plus an attention factor (mscale)
           that multiplies cos and sin (so q.k scales by its square)

The config is read in both forms found on disk: `rope_scaling` + top-level `rope_theta` (transformers 4) and
`rope_parameters` (transformers 5).

Angles are computed in float64 (position * inv_freq) before cos/sin: float32 positions lose integer precision
above 2^24 (16.7M) and a float32 angle at position 1e7 is off by up to ~0.5 rad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # dynamic: the length past which theta grows; llama3/yarn: the pretraining length
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def parse_rope_config(cfg: dict, head_dim: int) -> RopeConfig:
    """RopeConfig from a config.json dict (either `rope_parameters` or `rope_scaling` + `rope_theta`)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError("per-layer-type rope_parameters are not supported (expected one global RoPE setting)")
    scaling = dict(params or cfg.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", cfg.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"unsupported RoPE scaling type {rope_type!r} (expected one of {', '.join(ROPE_TYPES)})")
    partial = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(f"partial_rotary_factor={partial} is not supported (expected RoPE over the full head_dim)")
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    # transformers: the pretraining length comes from a top-level field if there is one (Phi-3 style), else
    # from the scaling dict, else max_position_embeddings.
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    factor = scaling.get("factor")

    def need(key, value):
        if value is None:
            raise ModelLoadError(f"RoPE scaling type {rope_type!r} needs '{key}' in the config's rope settings")
        return value

    kwargs: dict = dict(head_dim=head_dim, theta=theta, rope_type=rope_type, max_position_embeddings=max_pos)
    if rope_type in ("linear", "dynamic"):
        kwargs["factor"] = float(need("factor", factor))
    elif rope_type == "llama3":
        kwargs.update(factor=float(need("factor", factor)),
                      low_freq_factor=float(need("low_freq_factor", scaling.get("low_freq_factor"))),
                      high_freq_factor=float(need("high_freq_factor", scaling.get("high_freq_factor"))),
                      original_max_position_embeddings=int(original or max_pos))
        if kwargs["high_freq_factor"] <= kwargs["low_freq_factor"]:
            raise ModelLoadError("llama3 RoPE needs high_freq_factor > low_freq_factor")
    elif rope_type == "yarn":
        original = int(original or max_pos)
        if factor is None:  # DeepSeek style: implied by the two lengths
            factor = max_pos / original
        opt = lambda key: None if scaling.get(key) is None else float(scaling[key])  # noqa: E731
        kwargs.update(factor=float(factor), original_max_position_embeddings=original,
                      beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
                      attention_factor=opt("attention_factor"), mscale=opt("mscale"),
                      mscale_all_dim=opt("mscale_all_dim"), truncate=bool(scaling.get("truncate", True)))
    if kwargs.get("factor", 1.0) <= 0:
        raise ModelLoadError(f"RoPE scaling factor must be positive, got {kwargs['factor']}")
    return RopeConfig(**kwargs)


def _default_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    # Same float32 expression as transformers, so the frequencies agree bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def compute_inv_freq(rc: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling applied to cos/sin) for the static part of the config.

    For 'dynamic' this is the unscaled frequency set, used while a sequence is within max_position_embeddings."""
    dim = rc.head_dim
    inv_freq = _default_inv_freq(rc.theta, dim)
    if rc.rope_type == "linear":
        return inv_freq / rc.factor, 1.0
    if rc.rope_type == "llama3":
        old_len = rc.original_max_position_embeddings
        low_wavelen = old_len / rc.low_freq_factor
        high_wavelen = old_len / rc.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rc.factor, inv_freq)
        smooth = (old_len / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rc.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rc.rope_type == "yarn":
        return _yarn_inv_freq(rc)
    return inv_freq, 1.0


def _yarn_inv_freq(rc: RopeConfig) -> tuple[torch.Tensor, float]:
    dim, base, factor = rc.head_dim, rc.theta, rc.factor
    if rc.attention_factor is not None:
        attention = rc.attention_factor
    elif rc.mscale and rc.mscale_all_dim:
        attention = _yarn_mscale(factor, rc.mscale) / _yarn_mscale(factor, rc.mscale_all_dim)
    else:
        attention = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength makes num_rotations turns over the pretraining length
        turns = rc.original_max_position_embeddings / (num_rotations * 2 * math.pi)
        return (dim * math.log(turns)) / (2 * math.log(base))

    low, high = correction_dim(rc.beta_fast), correction_dim(rc.beta_slow)
    if rc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for arbitrary absolute positions, computed on the fly (one call per forward, shared by layers).

    Returned on the device of `positions`."""

    def __init__(self, config: RopeConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        # A plain float32 attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq64(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device=device, dtype=torch.float64)
        return self._on_device[device]

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Per-token inv_freq [T, D/2] for dynamic NTK: theta grows with the sequence's current length."""
        rc = self.config
        dim = rc.head_dim
        lengths, index = torch.unique(seq_lens.to(torch.int64), return_inverse=True)
        table = []
        for length in lengths.tolist():
            if length <= rc.max_position_embeddings:
                table.append(self.inv_freq)
                continue
            # float32 tensor arithmetic as in transformers (there seq_len is a tensor)
            seq = torch.tensor(length, dtype=torch.int64)
            base = rc.theta * ((rc.factor * seq / rc.max_position_embeddings) - (rc.factor - 1)) ** (dim / (dim - 2))
            table.append(_default_inv_freq(base, dim))
        return torch.stack(table)[index.cpu()]

    def cos_sin(self, positions: torch.Tensor,
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim/2] float32 for positions [T] (attention scaling folded in).

        seq_lens [T]: the length of each token's sequence in this step (context after the step), used only by
        'dynamic' scaling; defaults to max(positions) + 1 for all tokens."""
        device = positions.device
        if self.config.rope_type == "dynamic":
            if seq_lens is None:
                top = int(positions.max().item()) + 1 if positions.numel() else 0
                seq_lens = torch.full_like(positions, top)
            inv_freq = self._dynamic_inv_freq(seq_lens).to(device=device, dtype=torch.float64)
            angles = positions.to(torch.float64)[:, None] * inv_freq
        else:
            angles = positions.to(torch.float64)[:, None] * self._inv_freq64(device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.float(), sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos/sin [T, D/2] in the rotate_half layout (pairs (i, i + D/2)).

    Math in float32 (then back to x's dtype): a bf16 rotation of a bf16 vector loses more than the model needs."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
