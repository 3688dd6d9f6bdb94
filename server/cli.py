"""`longserve` command line: serve, generate, bench, profile, eval.

The CLI is the top of the stack, so it may reach every folder; it imports each subcommand's module only
when that subcommand runs (so `longserve generate` never needs fastapi, and `--help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..engine.config import add_engine_arguments, config_from_args
from ..engine.errors import EngineError

# subcommand -> module with add_parser(subparsers) and run(args) -> int
EXTERNAL_COMMANDS = {
    "serve": "longserve.server.app",
    "bench": "longserve.bench.cli",
    "profile": "longserve.policies.cli",
    "eval": "longserve.evals.cli",
}


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete one prompt and print the text",
                              description="Complete one prompt with the engine and print the completion.")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed-sample", type=int, default=None, dest="sample_seed", help="sampling seed")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    add_engine_arguments(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from ..engine import SamplingParams
    from ..engine.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    llm = LLM.from_config(config_from_args(args))
    if args.raw or getattr(llm.tokenizer, "chat_template", None) is None:
        out = llm.generate(args.prompt, params)
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    print(out[0].outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longserve",
        description="Long-context LLM inference server with sparse attention backends "
                    "(dense, superlinear, hylra, routing) over a paged KV cache.")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,bench,profile,eval}")
    for name, module in EXTERNAL_COMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as e:  # the subcommand's extras are missing: keep it listed, explain on use
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, name=name: _unavailable(name, e))
    _add_generate(sub)
    return parser


def _unavailable(name: str, error: Exception) -> int:
    print(f"longserve {name}: unavailable in this install ({error}); install longserve[server]", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (EngineError, OSError) as e:
        print(f"longserve {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
