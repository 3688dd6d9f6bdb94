"""Quality of a HyLRA policy against dense attention on long text: perplexity, next-token agreement, and greedy
continuation agreement.

    python -m longserve.policies.evaluate --policy policies/smollm2-135m-instruct.hylra.json \
        --text FILE [--model M] [--tokens 8176] [--gen-tokens 16] [--gen-points 8] [--json out.json]

Both runs prefill the same tokens in chunks through a paged cache (so HyLRA is sparse in prefill too, one
selection per query tile), score every next token, then continue greedily from several prompt lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from longserve.kernels.plan import AttentionPlan
from longserve.kernels.registry import build_backend
from longserve.kernels.base import StepState


@torch.inference_mode()
def run_text(model, token_ids: list[int], backend, block_size: int, chunk: int, gen_tokens: int,
             gen_points: list[int]) -> dict[str, Any]:
    """Teacher-forced NLL and argmax of every next token; then, from each cut point p (the text's first p
    tokens as the prompt), a greedy continuation of gen_tokens.

    The continuations reuse the prefilled cache: going from the last cut point to the first, a continuation
    from p only overwrites positions >= p, which no earlier cut point needs (the block bounds of a block are
    recomputed over its written part, so stale entries beyond it never count)."""
    from longserve.engine.testing import paged_cache_for, prefill_chunks, single_sequence_metadata

    param = next(model.parameters())
    caches, table = paged_cache_for(model, backend, len(token_ids) + gen_tokens, block_size)
    ids = torch.tensor(token_ids, dtype=torch.long, device=param.device)
    nll, argmax = [], []
    last_logits = None
    for start, logits in prefill_chunks(model, token_ids, backend, caches, table, block_size, chunk):
        end = start + logits.shape[0]
        targets = ids[start + 1:end + 1]
        scored = logits[:targets.shape[0]]
        nll.append(torch.nn.functional.cross_entropy(scored, targets, reduction="none"))
        argmax.append(scored.argmax(-1))
        last_logits = logits[-1]
    argmax_all = torch.cat(argmax).cpu()
    generated: dict[int, list[int]] = {}
    for p in sorted(set(gen_points), reverse=True):
        token = int(last_logits.argmax()) if p == len(token_ids) else int(argmax_all[p - 1])
        out = []
        for pos in range(p, p + gen_tokens):
            out.append(token)
            if pos == p + gen_tokens - 1:
                break
            meta = single_sequence_metadata(table, pos, pos + 1, block_size, param.device)
            hidden = model(torch.tensor([token], device=param.device), meta.positions, caches, meta, backend,
                           StepState())
            token = int(model.compute_logits(hidden).float()[-1].argmax())
        generated[p] = out
    return {"nll": torch.cat(nll).cpu(), "argmax": argmax_all, "generated": generated}


def compare(dense: dict[str, Any], sparse: dict[str, Any], min_context: int) -> dict[str, Any]:
    """Figures of the sparse run against the dense one: next-token figures over positions >= min_context
    (where the budget is smaller than the context), perplexities over all and over those positions, greedy
    continuations per cut point (share of equal tokens position by position, identical prefix length, share
    of continuations identical in full)."""
    n = dense["nll"].shape[0]
    tail = slice(min(min_context, n), n)
    points = sorted(dense["generated"])
    agree, prefix, exact = [], [], []
    for p in points:
        gd, gs = dense["generated"][p], sparse["generated"][p]
        agree.append(sum(a == b for a, b in zip(gd, gs)) / max(1, len(gd)))
        prefix.append(next((i for i, (a, b) in enumerate(zip(gd, gs)) if a != b), len(gd)))
        exact.append(gd == gs)
    k = max(1, len(points))
    has_tail = tail.start < n
    tail_ppl = lambda nll: math.exp(float(nll[tail].mean())) if has_tail else None  # noqa: E731
    return {
        "scored_tokens": n,
        "tail_from": tail.start,
        "dense_ppl": math.exp(float(dense["nll"].mean())),
        "hylra_ppl": math.exp(float(sparse["nll"].mean())),
        "dense_ppl_tail": tail_ppl(dense["nll"]),
        "hylra_ppl_tail": tail_ppl(sparse["nll"]),
        "next_token_agreement_tail": (float((dense["argmax"][tail] == sparse["argmax"][tail]).float().mean())
                                      if has_tail else None),
        "greedy_points": points,
        "greedy_tokens": len(dense["generated"][points[0]]) if points else 0,
        "greedy_agreement": sum(agree) / k,
        "greedy_identical_prefix_mean": sum(prefix) / k,
        "greedy_identical_share": sum(exact) / k,
    }


def cut_points(n: int, first: int, count: int) -> list[int]:
    """count prompt lengths spread evenly over [first, n] (n included)."""
    first = min(first, n)
    if count <= 1:
        return [n]
    return sorted({round(first + (n - first) * i / (count - 1)) for i in range(count)})


def evaluate(loaded, plan: AttentionPlan, token_ids: list[int], block_size: int = 64, chunk: int = 512,
             gen_tokens: int = 16, gen_points: int = 8, impl: str = "auto") -> dict[str, Any]:
    plan.check_model(loaded.config.model_info())
    dense_backend = build_backend("dense", loaded.config.num_layers, impl=impl)
    sparse_backend = build_backend(plan=plan, impl=impl)
    min_context = 2 * int(plan.params.get("topk_tokens", 2048))
    points = cut_points(len(token_ids), min_context, gen_points)
    t0 = time.time()
    dense = run_text(loaded.model, token_ids, dense_backend, block_size, chunk, gen_tokens, points)
    t1 = time.time()
    sparse = run_text(loaded.model, token_ids, sparse_backend, block_size, chunk, gen_tokens, points)
    t2 = time.time()
    result = compare(dense, sparse, min_context)
    modes = [lp.mode for lp in plan.layers]
    result.update(policy_layers={m: modes.count(m) for m in ("full", "compute", "reuse")},
                  params=dict(plan.params), block_size=block_size, chunk=chunk,
                  dense_s=round(t1 - t0, 1), hylra_s=round(t2 - t1, 1),
                  dense_greedy=dense["generated"], hylra_greedy=sparse["generated"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--text", required=True, help="plain text file (read as one document)")
    p.add_argument("--model", default=None, help="local HF directory (default: the embedded default model)")
    p.add_argument("--tokens", type=int, default=8176,
                   help="use the first N tokens of the text (default 8176: with 16 generated, the 8K context)")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens per continuation (default 16)")
    p.add_argument("--gen-points", type=int, default=8,
                   help="continuations from this many prompt lengths in [2 x topk_tokens, N] (default 8)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from longserve.engine.loader import load_model

    from .profiler import encode
    try:
        plan = AttentionPlan.load(args.policy)
        loaded = load_model(args.model, args.device, torch.float32)
        with open(args.text, encoding="utf-8") as f:
            ids = encode(loaded.tokenizer, f.read())[:args.tokens]
        result = evaluate(loaded, plan, ids, args.block_size, args.chunk, args.gen_tokens, args.gen_points)
    except (ValueError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_greedy")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
