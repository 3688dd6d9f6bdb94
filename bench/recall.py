"""Routing quality report: how much of the exact attention the routed selection covers, and perplexity vs dense.

    python -m longserve.bench.recall --model M --text FILE --budget-frac 0.1 [--json out.json]

The text's first --tokens tokens are run through the model in chunks of --chunk tokens (chunked prefill of one
sequence) with the routing backend. At every attention layer, for every --query-stride-th query that was
routed (its sequence had a codebook and a non-empty routed region), the exact softmax over all visible keys is
computed and compared with the routed selection (sinks + routed clusters + local region):
  mass recall   share of the exact attention mass on the selected keys (averaged over query heads)
  top-k recall  share of the exact top-k keys that were selected, k = the number of selected keys
  attended      selected keys / visible keys
Then the same tokens are run with dense attention; the perplexity of both runs is reported over all tokens and
over the routed tokens (those whose queries routed at least one layer). JSON with --json; a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..engine.testing import paged_cache_for, prefill_chunks
from ..kernels.base import AttentionMetadata, LayerCache, StepState
from ..kernels.reference import dense as ref_dense
from ..kernels.registry import build_backend


class RecallProbe:
    """Wraps the routing backend: attends with it, and measures its selections against exact attention."""

    def __init__(self, inner, num_layers: int, query_stride: int):
        self.inner = inner
        self.name = inner.name
        self.query_stride = query_stride
        self.rows = [[] for _ in range(num_layers)]  # per layer: (mass, topk, attended) per sampled query
        self.routed_positions: set[int] = set()

    def aux_specs(self, num_kv_heads, head_dim):
        return self.inner.aux_specs(num_kv_heads, head_dim)

    def free_sequence(self, seq_id):
        self.inner.free_sequence(seq_id)

    def forward(self, layer_idx, q, k, v, cache: LayerCache, meta: AttentionMetadata, state: StepState):
        out = self.inner.forward(layer_idx, q, k, v, cache, meta, state)
        sel = state.selections.get(layer_idx)
        if sel is not None:
            self._measure(layer_idx, q, cache, meta, sel)
        return out

    @torch.no_grad()
    def _measure(self, layer_idx, q, cache, meta, sel) -> None:
        hq, d = q.shape[1], q.shape[2]
        hkv = cache.num_kv_heads
        group = hq // hkv
        keys_cache = {}
        for t, tile in enumerate(sel.tiles):
            if tile.local_lo <= 0 or int(sel.routed_count[t].max()) == 0:
                continue  # not routed: dense, nothing to measure
            ctx = meta.context_lens_cpu[tile.seq]
            if tile.seq not in keys_cache:
                keys_cache[tile.seq] = ref_dense.gather_kv(cache.k, meta.block_tables[tile.seq], ctx).float()
            keys = keys_cache[tile.seq]  # [Hkv, ctx, D]
            chosen = torch.zeros(hkv, ctx, dtype=torch.bool, device=q.device)
            for h in range(hkv):
                chosen[h, sel.positions(t, h)] = True
            for m in range(tile.q_len):
                pos = tile.first_pos + m
                if pos % self.query_stride:
                    continue
                self.routed_positions.add(pos)
                qv = q[tile.q_start + m].float().reshape(hkv, group, d)  # [Hkv, G, D]
                logits = torch.einsum("hgd,hnd->hgn", qv, keys[:, :pos + 1]) * d ** -0.5
                probs = torch.softmax(logits, dim=-1)  # [Hkv, G, n]
                sel_mask = chosen[:, :pos + 1]  # [Hkv, n]
                mass = (probs * sel_mask[:, None]).sum(-1)  # [Hkv, G]
                n_sel = sel_mask.sum(-1)  # [Hkv]
                topk = []
                for h in range(hkv):
                    idx = probs[h].topk(int(n_sel[h]), dim=-1).indices  # [G, k]
                    topk.append(sel_mask[h][idx].float().mean(-1))
                self.rows[layer_idx].append((float(mass.mean()), float(torch.stack(topk).mean()),
                                             float(n_sel.float().mean()) / (pos + 1)))


def run_model(model, token_ids: list[int], backend, chunk: int, block_size: int = 16, progress: str = "") -> torch.Tensor:
    """Chunked prefill of one sequence; returns the log-probability of each next token [n - 1] (float32)."""
    n = len(token_ids)
    caches, table = paged_cache_for(model, backend, n, block_size)
    targets = torch.tensor(token_ids, dtype=torch.long)
    logprobs = torch.empty(n - 1, dtype=torch.float32)
    t0 = time.time()
    for a, logits in prefill_chunks(model, token_ids, backend, caches, table, block_size, chunk):
        b = a + logits.shape[0]
        upto = min(b, n - 1)
        if upto > a:
            logprobs[a:upto] = logits[:upto - a].log_softmax(-1).cpu().gather(1, targets[a + 1:upto + 1, None]).squeeze(1)
        if sys.stderr.isatty() or progress:
            print(f"\r{progress} {b}/{n} tokens ({time.time() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    print("", file=sys.stderr)
    backend.free_sequence(0)
    return logprobs


def _ppl(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.mean())) if logprobs.numel() else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longserve.bench.recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model directory (default: the embedded default model)")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the text to use (default 8192)")
    p.add_argument("--budget-frac", type=float, default=None, help="routed budget as a fraction of visible keys")
    p.add_argument("--budget-tokens", type=int, default=None, help="routed budget in tokens (instead of a fraction)")
    p.add_argument("--segment-tokens", type=int, default=None)
    p.add_argument("--tokens-per-cluster", type=int, default=None)
    p.add_argument("--kmeans-iters", type=int, default=None)
    p.add_argument("--decay", type=float, default=None)
    p.add_argument("--sink-tokens", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--prefill-tile", type=int, default=None)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens per step, default 512)")
    p.add_argument("--query-stride", type=int, default=16, help="measure every n-th query position (default 16)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense run (no perplexity comparison)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)

    from ..engine.loader import load_model  # bench -> engine is an allowed direction
    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"error: text file not found: {text_path}", file=sys.stderr)
        return 2
    params = {name: getattr(args, name) for name in
              ("budget_frac", "budget_tokens", "segment_tokens", "tokens_per_cluster", "kmeans_iters", "decay",
               "sink_tokens", "window", "prefill_tile") if getattr(args, name) is not None}
    params["prefill"] = "sparse"  # the report measures how the prompt chunks are routed
    device = torch.device(args.device)
    loaded = load_model(args.model, device, args.dtype)
    model, config = loaded.model, loaded.config
    token_ids = loaded.tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"][:args.tokens]
    if len(token_ids) < 2:
        print("error: the text has fewer than 2 tokens", file=sys.stderr)
        return 2
    try:
        backend = build_backend("routing", config.num_layers, params, impl=args.impl)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probe = RecallProbe(backend, config.num_layers, args.query_stride)
    t0 = time.time()
    routed_lp = run_model(model, token_ids, probe, args.chunk, progress="routing")
    routed_s = time.time() - t0
    dense_lp = None
    if not args.no_dense:
        dense_lp = run_model(model, token_ids, build_backend("dense", config.num_layers), args.chunk, progress="dense")

    layers = []
    for i, rows in enumerate(probe.rows):
        if rows:
            t = torch.tensor(rows)
            layers.append({"layer": i, "queries": len(rows), "mass_recall": float(t[:, 0].mean()),
                           "topk_recall": float(t[:, 1].mean()), "attended_frac": float(t[:, 2].mean())})
    every = torch.tensor([r for rows in probe.rows for r in rows]) if any(probe.rows) else torch.zeros(0, 3)
    first_routed = min(probe.routed_positions, default=len(token_ids))
    report = {
        "model": str(loaded.path), "text": str(text_path), "tokens": len(token_ids), "chunk": args.chunk,
        "params": backend.method.params, "query_stride": args.query_stride,
        "overall": {"queries": int(every.shape[0]),
                    "mass_recall": float(every[:, 0].mean()) if every.numel() else None,
                    "topk_recall": float(every[:, 1].mean()) if every.numel() else None,
                    "attended_frac": float(every[:, 2].mean()) if every.numel() else None,
                    "first_routed_position": first_routed},
        "layers": layers,
        "perplexity": {"routing": _ppl(routed_lp), "routing_routed_tokens": _ppl(routed_lp[first_routed:])},
        "seconds": {"routing": round(routed_s, 1)},
    }
    if dense_lp is not None:
        report["perplexity"].update({"dense": _ppl(dense_lp), "dense_routed_tokens": _ppl(dense_lp[first_routed:])})
    print(f"{'layer':>5} {'queries':>7} {'mass':>6} {'top-k':>6} {'attended':>8}")
    for row in layers:
        print(f"{row['layer']:>5} {row['queries']:>7} {row['mass_recall']:>6.3f} {row['topk_recall']:>6.3f} "
              f"{row['attended_frac']:>8.3f}")
    o = report["overall"]
    if o["queries"]:
        print(f"{'all':>5} {o['queries']:>7} {o['mass_recall']:>6.3f} {o['topk_recall']:>6.3f} {o['attended_frac']:>8.3f}")
    print("perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in report["perplexity"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
