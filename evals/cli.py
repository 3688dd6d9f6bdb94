"""`longserve eval`: long-context quality (RULER-style tasks, fidelity against dense, needle recall).

The options live here, free of torch, so `longserve --help` stays fast; the work is in run.py.
"""

from __future__ import annotations

import argparse
import sys

from ..bench.cli import METHOD_NAMES, _list, _method, _positive_int, parse_size
from ..engine.config import _json_object
from ..engine.errors import EngineError
from ..policies.cli import _fraction

TASK_NAMES = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt")  # mirrors tasks.TASKS


def _task(text: str) -> str:
    if text not in TASK_NAMES:
        raise argparse.ArgumentTypeError(f"unknown task {text!r} (expected some of {', '.join(TASK_NAMES)})")
    return text


def _length(text: str) -> int:
    value = parse_size(text)
    if value < 256:
        raise argparse.ArgumentTypeError(f"length must be at least 256 tokens, got {value}")
    return value


def _attention_config(text: str) -> dict:
    """'{"hylra": {...} or [{...}, ...], "routing": ...}' (per method, one or several variants) or '{...}' (one
    dict for every sparse method named, kept as {"*": ...})."""
    value = _json_object(text)
    if value and all(k in METHOD_NAMES for k in value):
        variants = [v for entry in value.values() for v in (entry if isinstance(entry, list) else [entry])]
        if not all(isinstance(v, dict) for v in variants) or any(v == [] for v in value.values()):
            raise argparse.ArgumentTypeError("per-method parameters must be JSON objects or non-empty lists of them")
        return value
    return {"*": value}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="long-context quality per attention method: RULER-style tasks, fidelity vs dense",
        description="Long-context quality of attention methods on the engine the server runs: RULER-style tasks "
                    "(pass key, needle-in-a-haystack single/multi-key/multi-value, variable tracking) generated "
                    "locally over shipped prose, greedy with the model's chat template; fidelity against dense "
                    "(perplexity, KL of the next-token distribution, top-1 agreement) on a shipped text; the "
                    "share of keys each method attended; with --diagnose, needle recall per layer and head. "
                    "Dense is always run as the reference.")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the embedded smollm2-135m-instruct)")
    p.add_argument("--attention", type=_list(_method), default=["dense", "superlinear", "hylra", "routing"],
                   help="methods, comma-separated (dense is always included; default: all four)")
    p.add_argument("--attention-config", type=_attention_config, default={}, metavar="JSON",
                   help='parameters per method, \'{"hylra": {"topk_tokens": 512}, "routing": {...}}\'; a list '
                        'runs several variants side by side, \'{"hylra": [{"topk_tokens": 512}, '
                        '{"topk_tokens": 256}]}\'; or one object applied to every sparse method named')
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="a policy file (longserve profile); used for the method it names")
    p.add_argument("--lengths", type=_list(_length), default=[2048],
                   help="context lengths in tokens (prompt + answer), e.g. 2K,4K,8K (default 2K)")
    p.add_argument("--depths", type=_list(_fraction), default=[0.1, 0.5, 0.9],
                   help="needle depths as fractions of the context (default 0.1,0.5,0.9)")
    p.add_argument("--samples", type=_positive_int, default=1, help="prompts per task, length and depth (default 1)")
    p.add_argument("--tasks", type=_list(_task), default=list(TASK_NAMES),
                   help=f"tasks, comma-separated (default: {','.join(TASK_NAMES)})")
    p.add_argument("--no-tasks", action="store_true", help="skip the tasks (fidelity only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default 0)")
    p.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=True,
                   help="teacher-forced fidelity against dense on a shipped text (default on)")
    p.add_argument("--fidelity-lengths", type=_list(_length), default=None,
                   help="text lengths for fidelity (default: --lengths)")
    p.add_argument("--fidelity-text", default=None, metavar="FILE",
                   help="UTF-8 text for fidelity (default: the Python reference texts in policies/calib/, about 17K tokens)")
    p.add_argument("--haystack", default=None, metavar="FILE",
                   help="UTF-8 prose for the tasks' haystacks (default: evals/data/haystack.txt, about 8K tokens)")
    p.add_argument("--fidelity-skip", type=int, default=None,
                   help="score fidelity from this position (default: each method's sinks + local window)")
    p.add_argument("--fidelity-decode", type=int, default=64,
                   help="decode the last N tokens of the fidelity text one per step (methods with prefill 'dense' "
                        "are sparse only there; default 64)")
    p.add_argument("--fidelity-chunk", type=_positive_int, default=512,
                   help="prefill chunk of the teacher-forced runs (default 512)")
    p.add_argument("--diagnose", action="store_true",
                   help="needle recall per layer and head at the question and decode tokens (slower)")
    p.add_argument("--chunk", type=_positive_int, default=2048,
                   help="tokens per engine step (the prefill chunk, as --max-num-batched-tokens; default 2048)")
    p.add_argument("--batch", type=_positive_int, default=8,
                   help="prompts in flight at once (the KV cache is sized for them; default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--attention-impl", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--block-size", type=_positive_int, default=None, help="tokens per KV block (engine default)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None, help="CPU KV-cache budget (engine default)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every sample and figure as JSON here")
    p.add_argument("--reference", default=None, metavar="JSON",
                   help="take dense's answers from an earlier --json of the same prompts (model, lengths, depths, "
                        "samples, seed, tasks, haystack) instead of running dense again; needs --no-fidelity")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="accuracy against length and depth per method (PNG; needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    p.error = lambda message: _fail(message, 2)  # one line, not argparse's usage block
    return p


def _fail(message: str, code: int) -> None:
    print(f"longserve eval: error: {message}", file=sys.stderr)
    sys.exit(code)


def run(args) -> int:
    if args.no_tasks:
        args.tasks = []
    try:
        from .run import run as run_eval

        return int(run_eval(args) or 0)
    except (EngineError, ValueError, OSError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
        return 1
