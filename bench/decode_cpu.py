"""One attention layer's decode step on the CPU reference paths, per method: `longserve bench decode-cpu`.

Times `backend.forward` of one layer for a decode step (one new token per sequence: the K/V write, the
method's search and its attention) for dense, superlinear, hylra and routing at given key counts and batch
sizes, on a paged cache of random keys with a shuffled block table. The methods share one cache (each
writes the same token to the same slot) and run interleaved step by step, so machine load hits them
alike; each step decodes the next position (a method's per-sequence state advances as in serving). Beside
each time: the share of the visible keys the method attended in that step (keys in its selection / keys
visible, over heads and sequences). Reported: the fastest and the median of the timed steps.

Runs on torch alone (no triton, no server packages). One thread by default (`--threads`); the load average
is recorded before and after, since a shared machine's load changes the figures. The options live in
cli.py (free of torch); server/cli.py dispatches here.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..kernels.base import AttentionMetadata, BackendError, LayerCache, StepState
from ..kernels.plan import AttentionPlan
from ..kernels.reference.block_summaries import summarize_full_blocks
from ..kernels.registry import build_backend
from .common import BenchError, format_tokens


@dataclass
class Variant:
    """A row label and the method and parameters it runs."""

    label: str
    method: str
    params: dict


@dataclass
class Row:
    keys: int
    batch: int
    label: str
    method: str
    params: dict
    best_ms: float
    median_ms: float
    attended_share: float
    vs_dense: float | None = None  # best time / dense's best time at the same keys and batch


def variants_of(args) -> list[Variant]:
    """dense first (every row is compared with it), the methods at their defaults, then the --variant rows."""
    out = [Variant("dense", "dense", {})]
    out += [Variant(m, m, {}) for m in args.attention if m != "dense"]
    out += [Variant(*v) for v in args.variant]
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise BenchError(f"row labels must differ: {', '.join(labels)}")
    return out


def make_backend(v: Variant):
    return build_backend(plan=AttentionPlan.uniform(v.method, 1, v.params), impl="torch")


def attended_keys(selection: Any, meta: AttentionMetadata, block_size: int) -> float:
    """Keys attended in a decode step, averaged over the selection's heads and summed over the sequences (a
    selection None: the layer attended densely). Each kind's selection is read as the method defines it."""
    pos = meta.positions.tolist()
    if selection is None:
        return float(sum(p + 1 for p in pos))
    kind = type(selection).__name__
    if kind == "SpanSelection":
        from ..kernels.reference.superlinear import attended_counts

        return sum(float(attended_counts(sel, sw_start, meta.positions[meta.query_slice(i)][s:e]).float()
                         .mean(0).sum())
                   for i, spans in enumerate(selection.per_seq) for s, e, sel, sw_start in spans.tiles)
    if kind == "HyLRASelection":
        offsets = torch.arange(block_size)
        total = 0.0
        for t, tile in enumerate(selection.tiles):
            blocks = selection.blocks[t].long()  # [heads, J], -1 padding
            keys = blocks[..., None] * block_size + offsets
            total += float(((blocks[..., None] >= 0) & (keys <= tile.last_pos)).sum()) / blocks.shape[0]
        return total
    if kind == "RoutingSelection":
        total = 0.0
        heads = selection.routed.shape[1]
        for t, tile in enumerate(selection.tiles):
            total += sum(int((selection.positions(t, h) <= tile.last_pos).sum()) for h in range(heads)) / heads
        return total
    raise BenchError(f"no attended-keys count for selection type {kind}")


def measure(keys: int, batch: int, variants: list[Variant], args) -> list[Row]:
    hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    total_steps = args.warmup + args.steps
    per_seq = -(-(keys + total_steps) // bs)
    gen = torch.Generator().manual_seed(args.seed)
    num_blocks = per_seq * batch
    backends = [make_backend(v) for v in variants]
    specs: dict = {}
    for b in backends:
        specs.update(b.aux_specs(hkv, d))
    k_cache = torch.randn(num_blocks, hkv, bs, d, generator=gen)
    v_cache = torch.randn(num_blocks, hkv, bs, d, generator=gen)
    aux = {name: torch.zeros((num_blocks, *shape), dtype=dt or torch.float32) for name, (shape, dt) in specs.items()}
    summarize_full_blocks(k_cache, aux, num_blocks)  # the per-block tables of the random keys
    cache = LayerCache(k_cache, v_cache, aux)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    times: list[list[float]] = [[] for _ in variants]
    shares: list[list[float]] = [[] for _ in variants]
    for step in range(total_steps):
        ctx = keys + step + 1  # the cache holds `keys` tokens before this step's token
        meta = AttentionMetadata.for_step(tables, [ctx] * batch, [1] * batch, bs)
        q = torch.randn(batch, hq, d, generator=gen)
        k = torch.randn(batch, hkv, d, generator=gen)
        v = torch.randn(batch, hkv, d, generator=gen)
        order = list(range(len(variants)))
        order = order[step % len(order):] + order[:step % len(order)]  # rotate who runs first
        for j in order:
            state = StepState()
            t0 = time.perf_counter()
            backends[j].forward(0, q, k, v, cache, meta, state)
            elapsed = time.perf_counter() - t0
            if step >= args.warmup:
                times[j].append(elapsed * 1e3)
                visible = sum(meta.context_lens_cpu) * 1.0
                shares[j].append(attended_keys(state.selections.get(0), meta, bs) / visible)
    rows = [Row(keys, batch, v.label, v.method, v.params, min(t), statistics.median(t), statistics.mean(s))
            for v, t, s in zip(variants, times, shares)]
    dense = next(r.best_ms for r in rows if r.method == "dense")
    for r in rows:
        r.vs_dense = r.best_ms / dense
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| keys | batch | method | best ms | median ms | x dense (best) | keys attended |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {format_tokens(r.keys)} | {r.batch} | {r.label} | {r.best_ms:.2f} | {r.median_ms:.2f} | "
                     f"{r.vs_dense:.2f} | {100 * r.attended_share:.1f}% |")
    return "\n".join(lines)


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give freed memory back (no mmap per large
    allocation, no trim), so a call does not pay page faults for the temporaries the previous call freed.
    Those faults made one method's fastest step vary 2x between runs on a loaded machine. False where the C
    library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def run(args) -> int:
    """`longserve bench decode-cpu` (parsed arguments); BenchError for bad parameters, before any timing."""
    variants = variants_of(args)
    for v in variants:
        try:
            make_backend(v)
        except BackendError as e:
            raise BenchError(f"{v.label}: {e}") from None
    torch.set_num_threads(args.threads)
    kept = False if args.system_malloc else keep_freed_memory()
    load_before = os.getloadavg()
    rows: list[Row] = []
    with torch.inference_mode():
        for keys in args.keys:
            for batch in args.batch:
                new = measure(keys, batch, variants, args)
                rows += new
                print(table(new).split("\n", 2)[2], flush=True)  # progress: this setting's rows
    load_after = os.getloadavg()
    print()
    print(table(rows))
    print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{args.threads} thread(s), fastest and median of {args.steps} timed steps per setting; freed memory "
          f"{'kept (mallopt)' if kept else 'returned to the system'}")
    if args.json:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": args.threads, "load_average_before": load_before,
               "load_average_after": load_after,
               "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                         "block_size": args.block_size}, "steps": args.steps, "warmup": args.warmup,
               "freed_memory_kept": kept}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0
