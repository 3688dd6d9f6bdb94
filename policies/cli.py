"""`longserve profile`: make a policy for a model from calibration text (see policies/profiler.py): HyLRA's
FULL/COMPUTE/REUSE layers, optionally with a method chosen per layer."""

from __future__ import annotations

import argparse
import sys

from longserve.engine.config import _json_object

from .profile_config import ProfileConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _method_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = ProfileConfig()
    p = subparsers.add_parser(
        "profile", help="profile a model on calibration text and write a policy (HyLRA, or a method per layer)",
        description="Run the model with dense attention over calibration text, measure per-layer sensitivity and "
                    "the overlap of top-k block selections between layers, choose FULL layers and solve the "
                    "COMPUTE/REUSE dynamic program; write the policy JSON (and PNG plots).")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the embedded smollm2-135m-instruct)")
    p.add_argument("--calib", required=True, metavar="FILE",
                   help="calibration text: plain text, or .jsonl with one string or {\"text\": ...} per line")
    p.add_argument("--out", required=True, metavar="POLICY.json", help="where to write the policy")
    p.add_argument("--topk-tokens", type=_positive_int, default=d.topk_tokens,
                   help=f"token budget per selection, sinks and recent blocks included (default {d.topk_tokens})")
    full = p.add_mutually_exclusive_group()
    full.add_argument("--full-layers", type=_non_negative_int, default=None, metavar="N",
                      help="number of most sensitive layers that run dense attention (default 2)")
    full.add_argument("--sparsity", type=_fraction, default=None, metavar="S",
                      help="share of sparse layers: ceil(layers * (1 - S)) most sensitive layers run dense")
    p.add_argument("--max-compute-layers", type=_positive_int, default=None, metavar="N",
                   help="most COMPUTE layers (default: half the non-full layers, rounded up)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write overlap.png and sensitivity.png here")
    p.add_argument("--sink-blocks", type=_non_negative_int, default=d.sink_blocks,
                   help=f"first blocks always kept (default {d.sink_blocks})")
    p.add_argument("--recent-blocks", type=_positive_int, default=d.recent_blocks,
                   help=f"most recent blocks always kept (default {d.recent_blocks})")
    p.add_argument("--block-size", type=_positive_int, default=d.block_size,
                   help=f"selection block size while profiling, tokens (default {d.block_size})")
    p.add_argument("--chunk-tokens", type=_positive_int, default=d.chunk_tokens,
                   help=f"prefill chunk size (default {d.chunk_tokens})")
    p.add_argument("--max-seq-tokens", type=_positive_int, default=d.max_seq_tokens,
                   help=f"longer documents are cut into pieces of this many tokens (default {d.max_seq_tokens})")
    p.add_argument("--probe-every", type=_positive_int, default=d.probe_every,
                   help=f"measure at one query position in this many (default {d.probe_every})")
    p.add_argument("--min-probe-context", type=_positive_int, default=None,
                   help="measure only queries with at least this much context (default 2 x --topk-tokens)")
    p.add_argument("--methods", type=_method_list, default=("hylra",), metavar="M[,M]",
                   help="methods a non-full layer may run: hylra, superlinear or both (default hylra); with "
                        "more than one, each layer gets the method attending the fewest keys among those whose "
                        "output error at the probes is at most --max-error")
    p.add_argument("--method-config", type=_json_object, default={}, metavar="JSON",
                   help="parameters of the searched methods other than hylra, e.g. '{\"superlinear\": "
                        "{\"sw_index\": 15}}' (written into the policy)")
    p.add_argument("--max-error", type=float, default=d.max_error, metavar="E",
                   help=f"method search: the relative output error a layer's method may make (default {d.max_error})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype while profiling (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args) -> ProfileConfig:
    return ProfileConfig(topk_tokens=args.topk_tokens, sink_blocks=args.sink_blocks,
                         recent_blocks=args.recent_blocks, block_size=args.block_size, full_layers=args.full_layers,
                         sparsity=args.sparsity, max_compute_layers=args.max_compute_layers,
                         chunk_tokens=args.chunk_tokens, max_seq_tokens=args.max_seq_tokens,
                         probe_every=args.probe_every, min_probe_context=args.min_probe_context,
                         methods=args.methods, method_params=args.method_config, max_error=args.max_error)


def layer_label(lp) -> str:
    """F, C, R<source>; a layer naming its own method gets it after a colon (C:superlinear)."""
    mode = lp.mode[0].upper() + (str(lp.source) if lp.source is not None else "")
    return mode + (f":{lp.method}" if lp.method else "")


def run(args) -> int:
    from .profiler import profile

    try:
        cfg = config_from_args(args)
        plan = profile(args.model, args.calib, args.out, cfg, plots_dir=args.plots, device=args.device,
                       dtype=args.dtype, progress=not args.quiet)
    except ValueError as e:  # ProfileError, BackendError: bad input, one line
        print(f"longserve profile: error: {e}", file=sys.stderr)
        return 2
    modes = " ".join(layer_label(lp) for lp in plan.layers)
    dp_info = plan.profile["dp"]
    print(f"layers: {modes}")
    print(f"full: {plan.profile['full_layers']}, hylra compute: {dp_info['num_compute']}, "
          f"min overlap {dp_info.get('min_overlap', '-')}, probes {plan.profile['num_probes']}, "
          f"{plan.profile['elapsed_s']} s")
    if "methods" in plan.profile:
        chosen = plan.profile["methods"]["chosen"]
        print("methods: " + ", ".join(f"{m} {chosen.count(m)}" for m in dict.fromkeys(chosen)))
    print(f"policy written to {args.out}" + (f", plots in {args.plots}" if args.plots else ""))
    return 0
