"""`longserve eval`: long-context quality of every attention method against dense, on the engine the server runs.

Per method one engine (engine/llm.py's LLM, the same model runner, scheduler and backend as the server), its
backend wrapped in a SelectionProbe (evals/probe.py) that measures the share of keys attended and, with
--diagnose, the needle recall. Then:
  tasks     RULER-style prompts (evals/tasks.py) through the engine, all prompts of a method batched, greedy
  fidelity  teacher-forced chunked prefill of a shipped text through the model with each method's backend,
            in lockstep with dense: perplexity, KL(dense || method) of the next-token distribution and top-1
            agreement over the positions past the method's local window
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from ..engine.config import EngineConfig
from ..engine.errors import EngineError
from ..kernels.plan import AttentionPlan
from .probe import SelectionProbe
from .tasks import Sample, TaskBuilder, encode, load_fidelity_text, load_haystack_text, score

# Greedy tokens per task: room for the answer (4 seven-digit numbers for multivalue) and a little more.
MAX_TOKENS = {"passkey": 12, "niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "vt": 12}


class EvalError(EngineError):
    """A bad eval setting (reported in one line)."""


def method_label(method: str, params: dict, policy: bool) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    label = method + (" (policy)" if policy else "")
    return f"{label} [{inner}]" if inner else label


def resolve_attention_config(args) -> dict[str, list[dict]]:
    """--attention-config as {method: [params, ...]} (one engine per entry; a method given one object has one
    variant): a flat object (parsed as {"*": ...}) applies to every sparse method named; per-method entries
    must name methods in --attention."""
    config = dict(args.attention_config)
    shared = config.pop("*", None)
    if shared is not None:
        return {m: [dict(shared)] for m in args.attention if m != "dense"}
    unknown = sorted(set(config) - set(args.attention))
    if unknown:
        raise EvalError(f"--attention-config names {', '.join(unknown)}, not in --attention")
    return {m: [dict(p) for p in (v if isinstance(v, list) else [v])] for m, v in config.items()}


def method_runs(args) -> list[tuple[str, dict, str | None]]:
    """(method, parameters, policy file or None) of every engine to run: dense first, then each variant of each
    method; --policy goes to the variants of the method it names."""
    config = resolve_attention_config(args)
    methods = [m for m in dict.fromkeys(args.attention) if m != "dense"]
    policy_method = AttentionPlan.load(args.policy).method if args.policy else None
    if policy_method is not None and policy_method not in methods:
        raise EvalError(f"the policy {args.policy} is for {policy_method}, which is not in --attention")
    return [("dense", {}, None)] + [(m, p, args.policy if m == policy_method else None)
                                    for m in methods for p in config.get(m) or [{}]]


def build_engine(args, method: str, params: dict, max_len: int, policy: str | None = None):
    """An LLM for `method` with the eval's settings: prefix caching off (every prompt is prefilled in full, so
    the attended share covers it), --chunk tokens per step, at most --batch prompts at once and a KV cache
    sized for them (unless --kv-cache-memory-gb is given)."""
    from ..engine.llm import LLM
    from ..engine.llm_engine import resolve_device

    block = args.block_size or (64 if resolve_device(args.device).type == "cuda" else 16)
    blocks = None if args.kv_cache_memory_gb else args.batch * (-(-max_len // block) + 1)
    config = EngineConfig(model=args.model, attention=method, attention_config=params, policy=policy,
                          device=args.device, dtype=args.dtype, attention_impl=args.attention_impl,
                          max_model_len=max_len, block_size=block, num_kv_blocks=blocks,
                          kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.batch,
                          max_num_batched_tokens=args.chunk, enable_prefix_caching=False,
                          seed=args.seed)
    llm = LLM.from_config(config)
    probe = SelectionProbe(llm.engine.backend)
    llm.engine.backend = probe
    llm.engine.runner.backend = probe
    return llm, probe, method_label(method, params, policy is not None)


def run_tasks(llm, probe: SelectionProbe, samples: list[Sample], label: str, diagnose: bool, progress: bool,
              reference: dict[tuple, bool] | None = None) -> list[dict[str, Any]]:
    """Every sample through the engine (submitted together, stepped to completion); one record per sample.
    reference: dense's outcome per sample key, for the diagnosis verdict."""
    from tqdm import tqdm

    from ..engine import SamplingParams

    engine = llm.engine
    ids, seqs = {}, []
    for s in samples:
        rid = engine.add_request(s.prompt_ids, SamplingParams(max_tokens=MAX_TOKENS[s.task], temperature=0.0))
        seq = engine.requests[rid].seqs[0]
        ids[rid] = (s, seq.seq_id)
        seqs.append(seq)
        if diagnose:
            probe.watch(seq.seq_id, s.evidence_positions, s.question_start, len(s.prompt_ids))
    done: dict[str, Any] = {}
    # Progress in tokens computed (prompts are batched, so whole prompts finish late and together).
    total = sum(len(s.prompt_ids) + MAX_TOKENS[s.task] for s in samples)
    bar = tqdm(total=total, desc=label[:40], unit="tok", file=sys.stderr, disable=not progress)
    try:
        while len(done) < len(samples):
            for out in engine.step():
                if out.finished and out.request_id in ids:
                    done[out.request_id] = out
            computed = sum(len(s.prompt_ids) + MAX_TOKENS[s.task] if seq.is_finished else seq.num_computed_tokens
                           for s, seq in zip(samples, seqs))
            bar.set_postfix_str(f"{len(done)}/{len(samples)} prompts")
            bar.update(computed - bar.n)
    finally:
        bar.close()
    records = []
    for rid, (s, seq_id) in ids.items():
        text = done[rid].outputs[0].text
        rec = {"task": s.task, "length": s.length, "depth": s.depth, "index": s.index,
               "prompt_tokens": len(s.prompt_ids), "answers": s.answers, "output": text,
               "correct": score(s.answers, text),
               "attended": None if probe.unmeasured else probe.attended_share(seq_id),
               "attended_decode": None if probe.unmeasured else probe.attended_share(seq_id, "decode")}
        if diagnose:
            rec["diagnosis"] = diagnosis_of(probe, seq_id)
            dense_ok = (reference or {}).get(sample_key(rec))
            rec["diagnosis"]["verdict"] = verdict(rec["correct"], dense_ok, rec["diagnosis"]["summary"])
        records.append(rec)
    return records


def sample_key(rec: dict[str, Any]) -> tuple:
    return rec["task"], rec["length"], rec["depth"], rec["index"]


def diagnosis_of(probe: SelectionProbe, seq_id: int, need: float = 0.1) -> dict[str, Any]:
    """Needle recall per layer and query head for one sample (see SelectionProbe), in two phases: the
    question's prompt tokens and the decoded tokens. A head "needs" the needle at a query when dense
    attention puts at least `need` of its mass on the evidence there."""
    w = probe.watches.get(seq_id)
    if w is None:
        return {}
    layers = []
    for layer_idx in sorted(w.records):
        recs = w.records[layer_idx]
        heads = sorted({r[1] for r in recs})
        row = {"layer": layer_idx, "mode": probe.plan.layers[layer_idx].mode, "heads": []}
        for h in heads:
            entry = {"head": h}
            for phase in ("prompt", "decode"):
                rs = [r for r in recs if r[1] == h and r[0] == phase]
                if not rs:
                    continue
                needed = [r for r in rs if r[3] >= need]
                entry[phase] = {
                    "queries": len(rs),
                    "recall": sum(r[2] for r in rs) / len(rs),
                    "dense_mass": sum(r[3] for r in rs) / len(rs),
                    "needed_queries": len(needed),
                    "recall_where_needed": (sum(r[2] for r in needed) / len(needed)) if needed else None,
                    # a missed needle the exact top-k of the same size would have kept: the search's fault
                    "missed_within_budget": sum(1 for r in rs if r[2] < 1.0 and r[4] < r[5]),
                    "missed_beyond_budget": sum(1 for r in rs if r[2] < 1.0 and r[4] >= r[5]),
                }
            row["heads"].append(entry)
        layers.append(row)
    return {"layers": layers, "summary": summarize_diagnosis(layers)}


def summarize_diagnosis(layers: list[dict]) -> dict[str, Any]:
    """Overall recall per phase over the sparse layers (all layers for a dense run): all heads, and the heads
    where dense attention needed the needle; the number of missed (query, head) pairs within and beyond the
    budget."""
    out: dict[str, Any] = {}
    layers = [row for row in layers if row["mode"] != "full"] or layers
    for phase in ("prompt", "decode"):
        entries = [h[phase] for row in layers for h in row["heads"] if phase in h]
        if not entries:
            continue
        q = sum(e["queries"] for e in entries)
        nq = sum(e["needed_queries"] for e in entries)
        out[phase] = {
            "recall": sum(e["recall"] * e["queries"] for e in entries) / q,
            "recall_where_needed": (sum((e["recall_where_needed"] or 0.0) * e["needed_queries"] for e in entries) / nq
                                    if nq else None),
            "missed_within_budget": sum(e["missed_within_budget"] for e in entries),
            "missed_beyond_budget": sum(e["missed_beyond_budget"] for e in entries),
            "missed_in_reuse_layers": sum(h[phase]["missed_within_budget"] + h[phase]["missed_beyond_budget"]
                                          for row in layers if row["mode"] == "reuse"
                                          for h in row["heads"] if phase in h),
            "lowest_recall_layers": [row["layer"] for row in sorted(
                layers, key=lambda row: sum(h[phase]["recall"] for h in row["heads"] if phase in h))][:5],
        }
    return out


def verdict(correct: bool, dense_correct: bool | None, summary: dict[str, Any]) -> str:
    """Where a sparse method's miss comes from, read off the needle recall (docs/quality.md):
    ok | model (dense misses too) | prefill (the needle was selected at the answer: the damage is upstream)
    | selection (most misses in layers reusing another layer's selection) | search (most misses were within
    the budget: exact attention of the same size would have kept the needle) | budget."""
    if correct:
        return "ok"
    if dense_correct is False:
        return "model"
    phase = summary.get("decode") or summary.get("prompt")
    if not phase:
        return "unknown"
    recall = phase["recall_where_needed"] if phase["recall_where_needed"] is not None else phase["recall"]
    misses = phase["missed_within_budget"] + phase["missed_beyond_budget"]
    if recall >= 0.9 or misses == 0:
        return "prefill"
    if phase["missed_in_reuse_layers"] * 2 > misses:
        return "selection"
    return "search" if phase["missed_within_budget"] >= phase["missed_beyond_budget"] else "budget"


# -- fidelity -----------------------------------------------------------------------------------------------
def local_window(backend, block_size: int) -> int:
    """Keys every query of the method attends whatever the budget (its sinks and local window): positions
    below this are attended densely anyway, so fidelity is measured past it."""
    from ..kernels.reference.superlinear import SpanParams

    method = getattr(backend, "method", None)
    params = getattr(method, "params", None)
    if isinstance(params, SpanParams):
        return params.window + 1 + params.sink_tokens
    if isinstance(params, dict) and "recent_blocks" in params:
        return (params["sink_blocks"] + params["recent_blocks"]) * block_size
    if isinstance(params, dict) and "window" in params:
        return params["sink_tokens"] + params["window"]
    return 0


@torch.inference_mode()
def run_fidelity(model, block_size: int, probes: dict[str, SelectionProbe], token_ids: list[int], chunk: int,
                 skip: int | None, decode: int, progress: bool) -> list[dict[str, Any]]:
    """Teacher-forced run of token_ids through the model with every method's backend in lockstep (the backends
    hold no weights: one model serves them all): all but the last `decode` tokens prefilled in chunks, those
    decoded one per step (a method with prefill "dense" is sparse only there). Per sparse method: perplexities
    of both (all positions, and past its window), and KL(dense || method) and top-1 agreement over the
    prefilled positions past its window and over the decoded positions. probes: label -> the method's
    (wrapped) backend; the first is dense."""
    from itertools import chain

    from tqdm import tqdm

    from ..engine.testing import paged_cache_for, prefill_chunks

    n = len(token_ids)
    split = max(1, n - decode)  # first decoded position
    streams = {}
    for label, probe in probes.items():
        probe.counts.clear()  # the tasks' counts are recorded already; seq id 0 is this text now
        caches, table = paged_cache_for(model, probe, n, block_size)
        streams[label] = chain(prefill_chunks(model, token_ids[:split], probe, caches, table, block_size, chunk),
                               prefill_chunks(model, token_ids, probe, caches, table, block_size, 1, first=split))
    labels = list(probes)
    dense = labels[0]
    ids = torch.tensor(token_ids)
    nll = {lb: [] for lb in labels}
    kl = {lb: [] for lb in labels[1:]}
    agree = {lb: [] for lb in labels[1:]}
    bar = tqdm(total=n, desc=f"fidelity {n} tokens", unit="tok", file=sys.stderr, disable=not progress)
    for chunks in zip(*(streams[lb] for lb in labels)):
        start = chunks[0][0]
        logp = {lb: c[1].log_softmax(-1).cpu() for lb, c in zip(labels, chunks)}
        m = logp[dense].shape[0]
        targets = ids[start + 1:start + m + 1]
        k = targets.shape[0]
        for lb in labels:
            nll[lb].append(-logp[lb][:k].gather(1, targets[:, None]).squeeze(1))
        p_dense = logp[dense][:k].exp()
        for lb in labels[1:]:
            kl[lb].append((p_dense * (logp[dense][:k] - logp[lb][:k])).sum(-1))
            agree[lb].append((logp[dense][:k].argmax(-1) == logp[lb][:k].argmax(-1)).float())
        bar.update(m)
    bar.close()
    out = []
    nll = {lb: torch.cat(v) for lb, v in nll.items()}
    mean = lambda x: float(x.mean()) if x.numel() else None  # noqa: E731
    for lb in labels[1:]:
        probe = probes[lb]
        tail = skip if skip is not None else local_window(probe.inner, block_size)
        tail = min(tail, split - 1)
        kls, ags = torch.cat(kl[lb]), torch.cat(agree[lb])
        out.append({
            "method": lb, "tokens": n, "skip": tail, "decoded": n - split,
            "attended": probe.attended_share(0), "attended_decode": probe.attended_share(0, "decode"),
            "ppl_dense": math.exp(float(nll[dense].mean())), "ppl": math.exp(float(nll[lb].mean())),
            "ppl_dense_past_window": math.exp(float(nll[dense][tail:].mean())),
            "ppl_past_window": math.exp(float(nll[lb][tail:].mean())),
            "kl_mean": mean(kls[tail:split]), "kl_p95": float(kls[tail:split].quantile(0.95)) if split > tail else None,
            "top1_agreement": mean(ags[tail:split]),
            "kl_mean_decode": mean(kls[split:]), "top1_agreement_decode": mean(ags[split:]),
        })
    for probe in probes.values():
        probe.free_sequence(0)  # routing keeps per-sequence cluster tables
    return out


# -- the whole run --------------------------------------------------------------------------------------------
def make_samples(builder: TaskBuilder, args) -> list[Sample]:
    samples = []
    for length in args.lengths:
        for task in args.tasks:
            budget = length - MAX_TOKENS[task]  # the prompt and the answer fit in `length`
            for depth in args.depths:
                for i in range(args.samples):
                    s = builder.build(task, budget, depth, i, args.seed)
                    s.length = length
                    samples.append(s)
    return samples


# Settings that decide the generated prompts: a --reference run must share them.
PROMPT_SETTINGS = ("model", "lengths", "depths", "samples", "seed", "tasks", "haystack")


def load_reference(args) -> list[dict[str, Any]]:
    """Dense's sample records from an earlier `--json` whose prompts are the ones this run generates."""
    if args.fidelity:
        raise EvalError("--reference gives dense's task answers only: add --no-fidelity (fidelity runs dense in "
                        "lockstep)")
    try:
        with open(args.reference) as f:
            earlier = json.load(f)
        settings, samples = earlier["settings"], earlier["samples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"--reference {args.reference}: not a longserve eval --json file ({e})") from None
    differ = [k for k in PROMPT_SETTINGS if settings.get(k) != getattr(args, k)]
    if differ:
        raise EvalError(f"--reference {args.reference} was run with other {', '.join(differ)}: its prompts differ")
    dense = [r for r in samples if r.get("method") == "dense"]
    if not dense:
        raise EvalError(f"--reference {args.reference} has no dense answers")
    return dense


def run_eval(args) -> dict[str, Any]:
    progress = not args.no_progress
    runs = method_runs(args)
    reference = load_reference(args) if getattr(args, "reference", None) else None
    if reference is not None:
        runs = runs[1:]  # dense's answers come from the earlier run
        if not runs or not args.tasks:
            raise EvalError("--reference needs tasks and at least one sparse method to run")
    t0 = time.time()
    probes: dict[str, SelectionProbe] = {}
    result: dict[str, Any] = {"settings": settings_of(args, runs), "methods": [], "samples": [], "fidelity": []}
    fidelity_lengths = (args.fidelity_lengths or args.lengths) if args.fidelity and len(runs) > 1 else []
    samples: list[Sample] | None = None
    text_ids: list[int] = []
    dense_llm = None
    if reference is not None:
        result["methods"].append({"method": "dense", "label": "dense"})
        result["samples"] += reference
        result["reference"] = args.reference
    for method, params, policy in runs:
        llm, probe, label = build_engine(args, method, params, max(args.lengths + fidelity_lengths) + 1, policy)
        if label in probes:
            raise EvalError(f"{label} is listed twice")
        if samples is None:  # the first engine brings the tokenizer: build every input before running any
            samples = make_samples(TaskBuilder(llm.tokenizer, read_text(args.haystack, load_haystack_text)), args)
            if fidelity_lengths:
                text_ids = fidelity_tokens(llm.tokenizer, args.fidelity_text, max(fidelity_lengths))
            dense_llm = llm  # kept for fidelity: its model serves every method's backend
            if reference is not None:
                missing = {sample_key(vars(s)) for s in samples} - \
                    {sample_key(r) for r in reference}
                if missing:
                    raise EvalError(f"--reference {args.reference} lacks {len(missing)} of this run's prompts")
        probes[label] = probe
        result["methods"].append({"method": method, "label": label})
        if samples:
            reference = {sample_key(r): r["correct"] for r in result["samples"] if r["method"] == "dense"}
            for rec in run_tasks(llm, probe, samples, label, args.diagnose, progress, reference):
                result["samples"].append({"method": label, **rec})
        if probe.unmeasured:
            result.setdefault("unmeasured", {})[label] = sorted(probe.unmeasured)
        del llm  # the next engine's weights and KV cache take its place
    for length in fidelity_lengths:
        runner = dense_llm.engine.runner
        result["fidelity"] += run_fidelity(runner.model, runner.block_size, probes, text_ids[:length],
                                           args.fidelity_chunk, args.fidelity_skip, args.fidelity_decode, progress)
    result["summary"] = summarize(result)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def fidelity_tokens(tokenizer, path: str | None, length: int) -> list[int]:
    """The fidelity text's tokens (the shipped texts unless --fidelity-text); an error when it is too short."""
    text = read_text(path, load_fidelity_text)
    ids = encode(tokenizer, text)
    if len(ids) < length:
        raise EvalError(f"the fidelity text has {len(ids)} tokens, fewer than the length {length} "
                        "(give a longer one with --fidelity-text)")
    return ids


def read_text(path: str | None, default) -> str:
    if path is None:
        return default()
    with open(path, encoding="utf-8") as f:
        return f.read()


def settings_of(args, runs: list[tuple[str, dict, str | None]]) -> dict[str, Any]:
    keys = ("model", "lengths", "depths", "samples", "seed", "tasks", "chunk", "batch", "device", "dtype",
            "policy", "fidelity", "fidelity_chunk", "fidelity_skip", "fidelity_decode", "fidelity_text", "haystack", "diagnose")
    return {"methods": [m for m, _, _ in runs], "attention_config": [p for _, p, _ in runs],
            **{k: getattr(args, k) for k in keys}}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy per (method, length) overall and per task, mean attended share, and per depth."""
    rows = []
    labels = [m["label"] for m in result["methods"]]
    lengths = sorted({s["length"] for s in result["samples"]})
    for label in labels:
        for length in lengths:
            recs = [s for s in result["samples"] if s["method"] == label and s["length"] == length]
            if not recs:
                continue
            att = [s["attended"] for s in recs if s["attended"] is not None]
            att_decode = [s["attended_decode"] for s in recs if s["attended_decode"] is not None]
            row = {"method": label, "length": length, "n": len(recs),
                   "accuracy": sum(s["correct"] for s in recs) / len(recs),
                   "attended": sum(att) / len(att) if att else None,
                   "attended_decode": sum(att_decode) / len(att_decode) if att_decode else None,
                   "prompt_tokens": sum(s["prompt_tokens"] for s in recs) / len(recs),
                   "by_task": {}, "by_depth": {}}
            for key, field in (("by_task", "task"), ("by_depth", "depth")):
                for value in dict.fromkeys(s[field] for s in recs):
                    sub = [s for s in recs if s[field] == value]
                    row[key][str(value)] = [sum(s["correct"] for s in sub), len(sub)]
            rows.append(row)
    return rows


# -- the table --------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(result: dict[str, Any]) -> str:
    st = result["settings"]
    lines = [f"longserve eval: model {st['model'] or 'smollm2-135m-instruct'}, {st['samples']} sample(s) per task, "
             f"length and depth, depths {','.join(str(d) for d in st['depths'])}, seed {st['seed']}", ""]
    rows = result["summary"]
    if rows:
        tasks = list(dict.fromkeys(t for r in rows for t in r["by_task"]))
        head = ["method", "length", "attended", "in decode", *tasks, "accuracy"]
        table = []
        for r in rows:
            table.append([r["method"], _tokens(r["length"]), _pct(r["attended"]), _pct(r["attended_decode"]),
                          *(f"{r['by_task'][t][0]}/{r['by_task'][t][1]}" if t in r["by_task"] else "-" for t in tasks),
                          _pct(r["accuracy"])])
        lines += ["Tasks (answers found / prompts; attended = keys attended / keys visible, over the prompt and the "
                  "answer, and in decode steps alone)", *_grid(head, table), ""]
        depths = list(dict.fromkeys(d for r in rows for d in r["by_depth"]))
        table = [[r["method"], _tokens(r["length"]),
                  *(f"{r['by_depth'][d][0]}/{r['by_depth'][d][1]}" if d in r["by_depth"] else "-" for d in depths)]
                 for r in rows]
        lines += ["By needle depth (all tasks)", *_grid(["method", "length", *[f"depth {d}" for d in depths]], table), ""]
    if result["fidelity"]:
        head = ["method", "tokens", "past", "attended", "in decode", "ppl dense", "ppl", "ppl +%", "past +%",
                "KL mean", "KL p95", "top-1", "KL decode", "top-1 decode"]
        num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        table = [[f["method"], _tokens(f["tokens"]), str(f["skip"]), _pct(f["attended"]), _pct(f["attended_decode"]),
                  f"{f['ppl_dense']:.3f}", f"{f['ppl']:.3f}", f"{100 * (f['ppl'] / f['ppl_dense'] - 1):+.2f}",
                  f"{100 * (f['ppl_past_window'] / f['ppl_dense_past_window'] - 1):+.2f}", num(f["kl_mean"], ".4f"),
                  num(f["kl_p95"], ".4f"), _pct(f["top1_agreement"]), num(f["kl_mean_decode"], ".4f"),
                  _pct(f["top1_agreement_decode"])]
                 for f in result["fidelity"]]
        lines += ["Fidelity against dense (teacher-forced; the last tokens decoded one per step; ppl +% over all "
                  "positions, past +% over positions >= past; KL and top-1 over the prefilled positions >= past and "
                  "over the decoded ones)", *_grid(head, table), ""]
    diag = [s for s in result["samples"] if s.get("diagnosis") and s["method"] != "dense"]
    if diag:
        dense_ok = {sample_key(s): s["correct"] for s in result["samples"] if s["method"] == "dense"}
        head = ["method", "task", "length", "depth", "dense", "ok", "recall prompt", "recall decode", "where needed",
                "missed in/out budget", "lowest layers", "verdict"]
        table = []
        for s in diag:
            sm = s["diagnosis"]["summary"]
            p, d = sm.get("prompt", {}), sm.get("decode", {})
            need = d.get("recall_where_needed", p.get("recall_where_needed"))
            yes = {True: "yes", False: "no", None: "-"}
            table.append([s["method"], s["task"], _tokens(s["length"]), str(s["depth"]),
                          yes[dense_ok.get(sample_key(s))], yes[s["correct"]],
                          _pct(p.get("recall")), _pct(d.get("recall")), _pct(need),
                          f"{p.get('missed_within_budget', 0) + d.get('missed_within_budget', 0)}/"
                          f"{p.get('missed_beyond_budget', 0) + d.get('missed_beyond_budget', 0)}",
                          ",".join(str(x) for x in (d or p).get("lowest_recall_layers", [])),
                          s["diagnosis"]["verdict"]])
        lines += ["Needle recall over the sparse layers (--diagnose; per query and head, at the question's prompt "
                  "tokens and the decoded tokens; where needed = where dense attention puts >= 10% on the needle)",
                  *_grid(head, table), ""]
        lines += ["Needle recall per layer at the decoded tokens (mean over samples and heads; - = dense layer)"]
        for label in dict.fromkeys(s["method"] for s in diag):
            lines += [f"  {label}", *_layer_recall_lines([s for s in diag if s["method"] == label])]
        lines.append("")
    for label, kinds in result.get("unmeasured", {}).items():
        lines.append(f"note: {label}: attended share not measured (selection type {', '.join(kinds)} not readable)")
    lines.append(f"{result['seconds']} s")
    return "\n".join(lines)


def _layer_recall_lines(samples: list[dict[str, Any]], per_line: int = 10) -> list[str]:
    recall: dict[int, list[float]] = {}
    modes: dict[int, str] = {}
    for s in samples:
        for row in s["diagnosis"]["layers"]:
            modes[row["layer"]] = row["mode"]
            recall.setdefault(row["layer"], []).extend(h["decode"]["recall"] for h in row["heads"] if "decode" in h)
    cells = [f"L{layer:02d} " + ("  -" if modes[layer] == "full" or not values else f"{sum(values) / len(values):.2f}")
             for layer, values in sorted(recall.items())]
    return ["    " + "  ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def run(args) -> int:
    result = run_eval(args)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=_jsonable)
    if args.plot:
        from .plot import plot_accuracy

        plot_accuracy(result, args.plot)
    return 0


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)
