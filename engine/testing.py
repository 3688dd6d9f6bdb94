"""Test helpers: tiny random-weight checkpoints (built offline in well under a second) and a single-sequence
paged prefill through the dense reference backend.

tiny_checkpoint writes a genuine Hugging Face directory (transformers' own config class and save_pretrained),
so the loader is exercised on the same files a real checkpoint has. Its tokenizer is byte-level (every byte is
a token, no merges) with ChatML special tokens and a chat template, built in code so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..kernels.base import AttentionMetadata, LayerCache, StepState

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_tokenizer_files: dict[str, str] | None = None


def _tokenizer_file_contents() -> dict[str, str]:
    """The tiny tokenizer's saved files (built once per process, then copied)."""
    global _tokenizer_files
    if _tokenizer_files is None:
        import tempfile

        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.chat_template = CHAT_TEMPLATE
        with tempfile.TemporaryDirectory() as tmp:
            fast.save_pretrained(tmp)
            _tokenizer_files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
    return _tokenizer_files


def write_tiny_tokenizer(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, text in _tokenizer_file_contents().items():
        (path / name).write_text(text)
    return path


def tiny_config_dict(arch: str = "llama", **overrides) -> dict:
    """The keyword arguments tiny_checkpoint gives transformers' config class."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    cfg = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "mistral":
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def tiny_checkpoint(path: str | Path, arch: str = "llama", seed: int = 0, init_std: float = 0.08,
                    **overrides) -> Path:
    """Write a tiny random-weight Hugging Face checkpoint of `arch` (llama, mistral, qwen2, qwen3) to `path`.

    overrides go to transformers' config class (e.g. num_hidden_layers=4, tie_word_embeddings=True,
    rope_parameters={...}). Every weight, bias and norm scale is drawn from a generator seeded with `seed`
    (norms around 1, biases non-zero), so the same arguments give the same files. Returns the path."""
    import transformers

    cfg = tiny_config_dict(arch, **overrides)
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHS[arch])
    config = config_cls(**cfg)
    with torch.device("cpu"):
        model = model_cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(init_std * noise)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def tiny_hf_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# -- running a model outside the engine ------------------------------------------------------------------------

def make_caches(config, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", aux_specs: dict | None = None) -> list[LayerCache]:
    """One zeroed paged LayerCache per layer (plus the backend's aux tables, if given)."""
    shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)
    caches = []
    for _ in range(config.num_layers):
        aux = {name: torch.zeros((num_blocks, *s), dtype=dt or dtype, device=device)
               for name, (s, dt) in (aux_specs or {}).items()}
        caches.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device), aux))
    return caches


def single_sequence_metadata(block_table: list[int], start: int, end: int, block_size: int,
                             device: torch.device | str = "cpu", seq_id: int = 0) -> AttentionMetadata:
    """Metadata for one sequence whose tokens start..end-1 are computed in this step (start..0 already cached)."""
    return AttentionMetadata.for_step([block_table], [end], [end - start], block_size, device, [seq_id])


def paged_cache_for(model, backend, tokens: int, block_size: int, spare_blocks: int = 0
                    ) -> tuple[list[LayerCache], list[int]]:
    """Zeroed paged caches (with the backend's aux tables) for one sequence of `tokens` in the model's dtype
    and device, and its block table (blocks 0.., plus spare_blocks unused ones in the cache)."""
    c = model.config
    param = next(model.parameters())
    num_blocks = -(-tokens // block_size)
    caches = make_caches(c, num_blocks + spare_blocks, block_size, param.dtype, param.device,
                         backend.aux_specs(c.num_kv_heads, c.head_dim))
    return caches, list(range(num_blocks))


@torch.inference_mode()
def prefill_chunks(model, token_ids: list[int], backend, caches: list[LayerCache], table: list[int],
                   block_size: int, chunk: int, first: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunked prefill of one sequence through the paged cache (as the engine's scheduler cuts a long prompt),
    from position `first` (the cache holds the tokens before it): yields (start, float32 logits of tokens
    start..start + chunk - 1) per chunk. chunk 1 runs decode steps."""
    param = next(model.parameters())
    ids = torch.tensor(token_ids, dtype=torch.long, device=param.device)
    for start in range(first, len(token_ids), chunk):
        end = min(len(token_ids), start + chunk)
        meta = single_sequence_metadata(table, start, end, block_size, param.device)
        hidden = model(ids[start:end], meta.positions, caches, meta, backend, StepState())
        yield start, model.compute_logits(hidden).float()


def run_sequence(model, token_ids: list[int], backend=None, block_size: int = 4, chunk: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """Logits [len(token_ids), vocab] (float32) of one sequence run through `model` over a paged cache with a
    shuffled block table, in chunks of `chunk` tokens (None: one prefill). backend defaults to dense."""
    from ..kernels.registry import build_backend

    backend = backend or build_backend("dense", model.config.num_layers, impl="torch")
    n = len(token_ids)
    caches, table = paged_cache_for(model, backend, n, block_size, spare_blocks=3)
    perm = torch.randperm(len(table) + 3, generator=torch.Generator().manual_seed(seed))
    table = perm[:len(table)].tolist()  # scattered physical blocks, as the engine's free list gives
    return torch.cat([logits for _, logits in prefill_chunks(model, token_ids, backend, caches, table, block_size,
                                                             chunk or n)])


@torch.inference_mode()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: list[int] | None = None,
                    block_size: int = 16, backend=None) -> list[int]:
    """Greedy continuation of one prompt with a paged cache (prefill, then one token per step)."""
    from ..kernels.registry import build_backend

    c = model.config
    param = next(model.parameters())
    backend = backend or build_backend("dense", c.num_layers, impl="torch")
    total = len(prompt_ids) + max_new_tokens
    num_blocks = (total + block_size - 1) // block_size
    caches = make_caches(c, num_blocks, block_size, param.dtype, param.device,
                         backend.aux_specs(c.num_kv_heads, c.head_dim))
    table = list(range(num_blocks))
    tokens = list(prompt_ids)
    start, generated = 0, []
    for _ in range(max_new_tokens):
        ids = torch.tensor(tokens[start:], dtype=torch.long, device=param.device)
        meta = single_sequence_metadata(table, start, len(tokens), block_size, param.device)
        hidden = model(ids, meta.positions, caches, meta, backend, StepState())
        token = int(model.compute_logits(hidden[-1:]).argmax(-1).item())
        start = len(tokens)
        tokens.append(token)
        generated.append(token)
        if eos_token_ids and token in eos_token_ids:
            break
    return generated
