"""Engine configuration: every option the Python API, the CLI and the server expose."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import EngineError


@dataclass
class EngineConfig:
    model: str | None = None  # local HF directory, or None / "smollm2-135m-instruct" for the embedded default
    attention: str = "dense"  # dense | superlinear | hylra | routing
    attention_config: dict[str, Any] = field(default_factory=dict)  # the method's parameters ({method: {...}} per method)
    policy: str | None = None  # policy JSON (per-layer methods and modes); wins over `attention`
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    attention_impl: str = "auto"  # auto | torch | triton
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int | None = None  # tokens per KV block (default 64 on GPU, 16 on CPU)
    num_kv_blocks: int | None = None  # fixed KV capacity in blocks (overrides the memory-based sizing)
    kv_cache_memory_gb: float | None = None  # CPU: KV budget in GiB (default 2)
    gpu_memory_utilization: float = 0.9  # GPU: share of total memory the engine may use
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 8192  # tokens per step (prefill chunk budget)
    max_waiting: int = 1024  # bound of the waiting queue (the server answers 503 past it)
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds the sampling of requests without a seed of their own

    def __post_init__(self) -> None:
        checks = [
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.block_size is None or self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
             f"block_size must be a power of two in 1..256, got {self.block_size}"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}"),
            (self.max_model_len is None or self.max_model_len >= 2, f"max_model_len must be >= 2, got {self.max_model_len}"),
            (0.05 <= self.gpu_memory_utilization <= 1.0,
             f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}"),
            (self.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"),
            (self.attention_impl in ("auto", "torch", "triton"),
             f"attention_impl must be auto, torch or triton, got {self.attention_impl!r}"),
            (self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineError(message)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise EngineError(f"unknown engine option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**kwargs)


def _json_object(text: str) -> dict[str, Any]:
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_spans\": 3}'")
    return value


def add_engine_arguments(parser) -> None:
    """The engine's options as command-line flags (shared by serve, generate and bench)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory; default: the embedded smollm2-135m-instruct")
    g.add_argument("--attention", default="dense", choices=["dense", "superlinear", "hylra", "routing"],
                   help="attention method for every layer (a --policy file overrides it)")
    g.add_argument("--attention-config", type=_json_object, default={}, metavar="JSON",
                   help="the method's parameters as a JSON object, e.g. '{\"num_spans\": 3, \"sw_index\": 63}'; "
                        "with a policy that mixes methods, per method: '{\"hylra\": {\"topk_tokens\": 4096}}'")
    g.add_argument("--policy", default=None, metavar="FILE",
                   help="per-layer policy JSON (from `longserve profile`): method and full/compute/reuse per layer")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and KV-cache dtype (auto: float32 on CPU; on GPU the checkpoint's float16 or "
                        "bfloat16, else bfloat16)")
    g.add_argument("--attention-impl", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: Triton on GPU, PyTorch reference on CPU (auto), or forced")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion in tokens")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 64 on GPU, 16 on CPU)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fixed KV-cache size in blocks")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV-cache budget in GiB (CPU default 2; on GPU a cap below the memory-based size)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights + KV cache")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="tokens per engine step; long prompts are prefilled in chunks of this size")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="requests allowed to wait; past it the server answers 503")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt prefixes")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling of requests that carry no seed of their own (default 0)")


def config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model=args.model, attention=args.attention, attention_config=args.attention_config, policy=args.policy,
        device=args.device, dtype=args.dtype, attention_impl=args.attention_impl, max_model_len=args.max_model_len,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)
