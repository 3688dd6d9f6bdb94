"""`longserve bench throughput` (decode/prefill speed at long context per attention method) and
`longserve bench serve` (HTTP load against an OpenAI-compatible server). server/cli.py dispatches here.

The options live here, free of torch, so `longserve --help` stays fast; the work is in throughput.py and
serve.py, imported when a benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..engine.errors import EngineError

# Mirrors kernels/registry.py METHODS (kept here so building the parser never imports torch).
METHOD_NAMES = ("dense", "superlinear", "hylra", "routing")
PRESET_NAMES = ("tiny", "qwen2.5-7b-1m", "llama-3.1-8b")
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def parse_size(text: str) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '1.5M', '4096' (K = 1024, M = 1024^2, G = 1024^3)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 4096, 128K, 1M, 10M)")
    value = int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 token")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _list(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(t) for t in items]
    return parse


def _method(text: str) -> str:
    if text not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"unknown attention method {text!r} (expected some of "
                                         f"{', '.join(METHOD_NAMES)})")
    return text


def _method_params(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('must be a JSON object of method -> parameters, e.g. '
                                         '\'{"hylra": {"topk_tokens": 4096}}\'')
    unknown = sorted(set(value) - set(METHOD_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}")
    return value


def add_throughput_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help=f"shape preset with random weights ({', '.join(PRESET_NAMES)}), a local Hugging Face "
                        "checkpoint directory, or the default model's name (default: tiny)")
    p.add_argument("--context", type=_list(parse_size), default=[parse_size("128K")],
                   help="context lengths, comma-separated (K = 1024, M = 1024^2), e.g. 128K,1M,4M,10M; rounded up "
                        "to whole KV blocks (default 128K)")
    p.add_argument("--attention", type=_list(_method), default=None,
                   help=f"attention methods, comma-separated (default: all of {','.join(METHOD_NAMES)}); a method "
                        "that does not import is reported as not available")
    p.add_argument("--attention-config", type=_method_params, default={}, metavar="JSON",
                   help='parameters per method, e.g. \'{"hylra": {"topk_tokens": 4096}}\' (policies too)')
    p.add_argument("--policy", action="append", default=[], metavar="FILE",
                   help="also run a policy file (per-layer methods and modes; repeatable); its rows are named "
                        "policy:<file stem>. With --policy, --attention defaults to dense (the baseline)")
    p.add_argument("--batch", type=_list(_positive_int), default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--decode-steps", type=_positive_int, default=16, help="timed decode steps per batch (default 16)")
    p.add_argument("--warmup-steps", type=_positive_int, default=1,
                   help="untimed decode steps first (compiles kernels, builds per-sequence state; default 1)")
    p.add_argument("--prefill-tokens", type=parse_size, default=0,
                   help="also time a prefill of this many new tokens after the context (default: skip)")
    p.add_argument("--prefill-chunk", type=parse_size, default=8192,
                   help="tokens per prefill step (like the engine's --max-num-batched-tokens; default 8192)")
    p.add_argument("--kv", choices=["synthetic", "prefill"], default="synthetic",
                   help="synthetic: random keys/values written into the cache (fast, any length; labelled in the "
                        "output); prefill: each method prefills the context for real, in chunks (timed too)")
    p.add_argument("--separate-contexts", action="store_true",
                   help="give every sequence of a batch its own context blocks (memory x batch) instead of sharing "
                        "one (as sequences with a common cached prefix do)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights and KV-cache dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention-impl", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: Triton on CUDA, PyTorch reference on CPU (auto), or forced")
    p.add_argument("--block-size", type=_positive_int, default=None,
                   help="tokens per KV block (default 64 on CUDA, 16 on CPU, as the engine)")
    p.add_argument("--num-layers", type=_positive_int, default=None,
                   help="override the model's layer count (fewer layers let a big shape fit at 10M tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the synthetic KV and the tokens")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON here")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw decode tokens/s against context (log-log PNG)")


def _variant(text: str) -> tuple[str, str, dict]:
    """'LABEL=METHOD' or 'LABEL=METHOD:{json parameters}' -> (label, method, parameters)."""
    label, sep, rest = text.partition("=")
    method, _, raw = rest.partition(":")
    if not sep or not label or method not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=METHOD[:JSON] with METHOD one of "
                                         f"{', '.join(METHOD_NAMES)}")
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: parameters are not valid JSON: {e.msg}") from None
    if not isinstance(params, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: parameters must be a JSON object")
    return label, method, params


def add_decode_cpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=_list(parse_size), default=[parse_size(s) for s in ("1K", "4K", "16K")],
                   help="keys in the cache before each timed step, comma-separated (K = 1024; default 1K,4K,16K)")
    p.add_argument("--batch", type=_list(_positive_int), default=[1, 4], help="sequences per step (default 1,4)")
    p.add_argument("--attention", type=_list(_method), default=list(METHOD_NAMES),
                   help="methods at their engine defaults, comma-separated (default: all; dense always runs)")
    p.add_argument("--variant", type=_variant, action="append", default=[], metavar="LABEL=METHOD[:JSON]",
                   help="one more row with its own parameters, repeatable "
                        "(e.g. 'sl-w35x3=superlinear:{\"sw_index\": 5}')")
    p.add_argument("--heads", type=_positive_int, default=9, help="query heads (default 9, SmolLM2-135M's)")
    p.add_argument("--kv-heads", type=_positive_int, default=3, help="KV heads (default 3)")
    p.add_argument("--head-dim", type=_positive_int, default=64, help="head dimension (default 64)")
    p.add_argument("--block-size", type=_positive_int, default=16, help="KV block size (default 16, the CPU's)")
    p.add_argument("--steps", type=_positive_int, default=21, help="timed decode steps per setting (default 21)")
    p.add_argument("--warmup", type=_positive_int, default=2,
                   help="untimed steps first (routing clusters the cache there; default 2)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave the C allocator as it is (by default the bench keeps freed memory, so steps do not "
                        "pay page faults for the temporaries of the step before)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys, values and queries")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows and the environment as JSON")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from . import serve  # no torch, no httpx at import

    p = subparsers.add_parser("bench", help="benchmarks: decode/prefill throughput at long context, HTTP load",
                              description="Benchmarks. `throughput`: decode and prefill speed of every attention "
                                          "method at long context. `serve`: load test of an OpenAI-compatible "
                                          "server. `decode-cpu`: one attention layer's decode step per method on "
                                          "the CPU reference paths.")
    sub = p.add_subparsers(dest="bench_command", metavar="{throughput,serve,decode-cpu}")
    t = sub.add_parser("throughput", help="decode/prefill tokens/s at 128K-10M context per attention method",
                       description="Decode tokens/s (per batch size), the attention share of a step, prefill "
                                   "tokens/s, KV-cache bytes and peak memory at long context, for every attention "
                                   "method on the same cache, with ratios against dense. Prints a table; "
                                   "--json and --plot write the figures.")
    add_throughput_arguments(t)
    t.set_defaults(bench_func="throughput")
    s = sub.add_parser("serve", help="HTTP load generator for an OpenAI-compatible server (streaming completions)",
                       description=serve.__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(serve.__doc__.split("\n\n")[1:]))
    serve.add_arguments(s)
    s.set_defaults(bench_func="serve")
    d = sub.add_parser("decode-cpu", help="one attention layer's decode step per method on the CPU reference paths",
                       description="Times one layer's backend forward for a decode step (write, search, "
                                   "attention) per method on a paged cache of random keys, methods interleaved, "
                                   "with the share of keys each attended. Prints a table; --json writes it.")
    add_decode_cpu_arguments(d)
    d.set_defaults(bench_func="decode-cpu")
    p.set_defaults(func=run, bench_parser=p)
    return p


def run(args) -> int:
    which = getattr(args, "bench_func", None)
    if which is None:
        args.bench_parser.print_help()
        return 2
    try:
        if which == "throughput":
            from .throughput import run as run_throughput
            return int(run_throughput(args) or 0)
        if which == "decode-cpu":
            from .decode_cpu import run as run_decode_cpu
            return run_decode_cpu(args)
        from .serve import run as run_serve
        return int(run_serve(args) or 0)
    except EngineError as e:  # BenchError, or the engine's (a model that does not load, ...)
        print(f"longserve bench {which}: error: {e}", file=sys.stderr)
        return 1
