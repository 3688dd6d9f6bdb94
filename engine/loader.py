"""Load a model for the engine: config, safetensors weights and tokenizer from a local Hugging Face directory.

Rules: safetensors only (pickled .bin weights are refused: loading them can run arbitrary code), no remote code,
no network. Every failure is a ModelLoadError with a one-line message naming what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError
from .models.decoder import SUPPORTED_ARCHITECTURES, DecoderModel, ModelConfig

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: DecoderModel
    tokenizer: Any  # a transformers tokenizer (None only when load_model(..., tokenizer=False))
    config: ModelConfig
    path: Path
    dtype: torch.dtype  # of the weights (and of the engine's KV cache)


def is_default_model(model: str | os.PathLike | None) -> bool:
    return model is None or str(model).strip().lower() == DEFAULT_MODEL_NAME


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The local directory for `model`: the embedded default (converted on first use) or an existing directory."""
    if is_default_model(model):
        from .default_model import ensure_default_model
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(model)!r} not found (expected a local Hugging Face directory with "
                             f"config.json and *.safetensors, or {DEFAULT_MODEL_NAME!r})")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(model)!r} is not a directory (expected a Hugging Face model "
                             "directory with config.json and *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path} (expected a Hugging Face model directory)")
    return path.resolve()


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """The one rule for dtype 'auto' (the loader and the engine; docs/models.md): float32 on CPU, where bfloat16
    matmuls are slow; on CUDA the checkpoint's torch_dtype when it is float16 or bfloat16, else bfloat16 (a
    float32 or unstated checkpoint is served in half the memory, on the kernels' fast path)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        stated = _DTYPE_NAMES.get(str(config.torch_dtype or "").removeprefix("torch."))
        return stated if stated in (torch.float16, torch.bfloat16) else torch.bfloat16
    if name not in _DTYPE_NAMES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (expected auto, float32, float16 or bfloat16)")
    return _DTYPE_NAMES[name]


def safetensors_files(path: Path) -> list[Path]:
    """The weight files: those model.safetensors.index.json names, or every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index.name} lists shards that are missing: {', '.join(absent[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickled:
            raise ModelLoadError(f"{path} has only pickled weights ({', '.join(pickled[:3])}); safetensors are "
                                 "needed (convert them with transformers' save_pretrained(safe_serialization=True))")
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def _iter_tensors(files: list[Path]):
    from safetensors import safe_open
    from tqdm.auto import tqdm

    for file in tqdm(files, desc="loading weights", unit="shard", disable=len(files) < 2):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise ModelLoadError(f"cannot read {file.name}: {e}") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_tokenizer(path: Path):
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {path} (expected tokenizer.json, tokenizer.model or vocab.json)")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises many types here; the message is what matters
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {first_line}") from None


def load_model(model: str | os.PathLike | None, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = "auto", tokenizer: bool = True) -> LoadedModel:
    """Load `model` (None / 'smollm2-135m-instruct' = the embedded default, else a local HF directory)."""
    device = torch.device(device)
    path = resolve_model_path(model)
    config = ModelConfig.from_pretrained(path)
    files = safetensors_files(path)
    torch_dtype = resolve_dtype(dtype, config, device)
    net = DecoderModel(config, device=device, dtype=torch_dtype)
    loaded = net.load_weights(_iter_tensors(files))
    missing = net.missing_tensors(loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint in {path} lacks tensors {', '.join(missing[:3])}{more}")
    net.eval()
    tok = load_tokenizer(path) if tokenizer else None
    return LoadedModel(model=net, tokenizer=tok, config=config, path=path, dtype=torch_dtype)


__all__ = ["LoadedModel", "load_model", "resolve_model_path", "resolve_dtype", "load_tokenizer",
           "DEFAULT_MODEL_NAME", "SUPPORTED_ARCHITECTURES", "is_default_model"]
