"""HyLRA's offline profiler: run a model with dense attention over calibration text, measure per layer how
sparse its attention is and how much consecutive layers agree on the blocks they need, and turn that into a
policy (kernels/plan.py JSON) with the dynamic program of policies/dp.py.

What is measured, per layer and KV head, at "probe" queries (every `probe_every`-th position whose context
holds at least `min_probe_context` tokens), with the attention split into blocks of `block_size` tokens:
- mass_share: the share of visible blocks needed to hold `mass_threshold` (90%) of the attention mass
  (query heads of a group averaged): how dense the layer's attention is.
- topk_error: the relative L2 error of the attention output when restricted to the layer's own top-k
  selection (below) instead of every key: how much the layer loses under the budget. Layers are ranked by
  this for FULL (the highest become FULL), mass_share breaking ties.
- selection: as at run time, the first `sink_blocks` and the last `recent_blocks` blocks, then the blocks of
  highest attention mass (summed over the group's query heads: one selection per KV head) up to the budget.
- overlap O[i][j] = mean over probes of |S_i & S_j| / |S_j| (how much of layer j's selection layer i also
  needs), averaged over probes per KV head, then the minimum over KV heads (conservative: a REUSE layer
  serves every head with one selection).
The non-FULL layers go to the DP (COMPUTE vs REUSE segments, at most max_compute_layers COMPUTE layers).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from longserve.kernels.base import AttentionMetadata, LayerCache, StepState
from longserve.kernels.hylra import validate_params as hylra_validate
from longserve.kernels.plan import AttentionPlan, LayerPlan
from longserve.kernels.superlinear import backend_params as span_params
from longserve.kernels.reference import dense as ref_dense

from . import dp
from .profile_config import ProfileConfig, ProfileError


# ---------------------------------------------------------------------------------- calibration text
def read_calibration(path: str | Path) -> list[str]:
    """Documents of a calibration file: plain text (one document) or JSONL (.jsonl: one per line, a string or
    an object with a "text", "content" or "prompt" field)."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"calibration file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ProfileError(f"calibration file {p} is not UTF-8 text") from None
    if p.suffix.lower() != ".jsonl":
        docs = [raw] if raw.strip() else []
    else:
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProfileError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(item, dict):
                item = next((item[k] for k in ("text", "content", "prompt") if isinstance(item.get(k), str)), None)
            if not isinstance(item, str):
                raise ProfileError(f"{p}:{n}: expected a string or an object with a 'text' field")
            docs.append(item)
    if not docs:
        raise ProfileError(f"calibration file {p} holds no text")
    return docs


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text with a Hugging Face or `tokenizers` tokenizer (no special tokens)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


# ---------------------------------------------------------------------------------- recording backend
class RecordingBackend:
    """Dense attention (the reference) that also records, at probe queries, per-layer block statistics."""

    name = "profile"

    def __init__(self, num_layers: int, cfg: ProfileConfig):
        self.cfg = cfg
        self.num_layers = num_layers
        self.budget_blocks = -(-cfg.topk_tokens // cfg.block_size)
        self.mass_share: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # per probe batch [Hkv, P]
        self.topk_error: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.overlap_sum: torch.Tensor | None = None  # [Hkv, L, L]
        self.num_probes = 0
        self._selections: dict[int, torch.Tensor] = {}  # this chunk's selections [Hkv, P, nb] per layer
        # Method search (more than hylra alone): per method and layer, the output error and the share of visible
        # keys attended under the method's own run-time selection, per probe batch [Hkv, P].
        self.search = tuple(cfg.methods) != ("hylra",)
        self.method_error = {m: [[] for _ in range(num_layers)] for m in cfg.methods}
        self.method_keys = {m: [[] for _ in range(num_layers)] for m in cfg.methods}
        if "superlinear" in cfg.methods:
            self.span_params = span_params(cfg.method_params.get("superlinear"))

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {}

    def free_sequence(self, seq_id: int) -> None:
        pass

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttentionMetadata, state: StepState) -> torch.Tensor:
        ref_dense.write_kv(cache.k, cache.v, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for s in range(meta.num_seqs):
            out[meta.query_slice(s)] = _causal_sdpa(q[meta.query_slice(s)], cache, meta, s)
        self._record(layer_idx, q, cache, meta)
        return out

    def probe_rows(self, meta: AttentionMetadata) -> list[tuple[int, int]]:
        """(sequence, token row) of the step's probe queries."""
        rows = []
        for s in range(meta.num_seqs):
            sl = meta.query_slice(s)
            first = meta.context_lens_cpu[s] - meta.query_lens_cpu[s]
            for i in range(sl.stop - sl.start):
                pos = first + i
                if (pos + 1) % self.cfg.probe_every == 0 and pos + 1 >= self.cfg.probe_context:
                    rows.append((s, sl.start + i))
        return rows

    def _record(self, layer: int, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> None:
        rows = self.probe_rows(meta)
        if not rows:
            return
        if meta.num_seqs != 1:
            raise ProfileError("the profiler runs one sequence at a time")
        cfg, bs = self.cfg, self.cfg.block_size
        ctx = meta.context_lens_cpu[0]
        idx = torch.tensor([r for _, r in rows], device=q.device)
        qp = q[idx].transpose(0, 1).float()  # [Hq, P, D]
        keys = ref_dense.gather_kv(cache.k, meta.block_tables[0], ctx).float()  # [Hkv, N, D]
        vals = ref_dense.gather_kv(cache.v, meta.block_tables[0], ctx).float()
        hq, p, d = qp.shape
        hkv = keys.shape[0]
        group = hq // hkv
        pos = meta.positions[idx]  # [P]
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # [P, N]
        scores = torch.bmm(qp.reshape(hkv, group * p, d), keys.transpose(1, 2)).reshape(hq, p, ctx) * d ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)  # [Hq, P, N]
        nb = -(-ctx // bs)
        block_mass = torch.nn.functional.pad(probs, (0, nb * bs - ctx)).reshape(hq, p, nb, bs).sum(-1)
        visible = pos // bs + 1  # [P]
        block_ids = torch.arange(nb, device=q.device)

        # Share of visible blocks holding mass_threshold of the mass.
        sorted_mass = block_mass.sort(dim=-1, descending=True).values.cumsum(-1)
        needed = (sorted_mass < cfg.mass_threshold - 1e-6).sum(-1) + 1  # [Hq, P]
        share = (needed.float() / visible[None].float()).reshape(hkv, group, p).mean(1)
        self.mass_share[layer].append(share.cpu())

        # Runtime-like selection per KV head: sinks + recent forced, the rest by group mass.
        group_mass = block_mass.reshape(hkv, group, p, nb).sum(1)  # [Hkv, P, nb]
        last = (pos // bs)[:, None]
        forced = (block_ids[None] < cfg.sink_blocks) | ((block_ids[None] > last - cfg.recent_blocks)
                                                        & (block_ids[None] <= last))
        ranked = torch.where(forced[None], float("inf"), group_mass)
        ranked = ranked.masked_fill(block_ids[None, None] > last[None], float("-inf"))
        order = ranked.argsort(dim=-1, descending=True)
        take = torch.clamp(visible, max=max(self.budget_blocks, cfg.sink_blocks + cfg.recent_blocks))  # [P]
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, block_ids.expand_as(order).contiguous())
        selected = rank < take[None, :, None]  # [Hkv, P, nb]
        self._selections[layer] = selected

        # Output error under the layer's own selection.
        key_sel = selected.repeat_interleave(group, dim=0).repeat_interleave(bs, dim=-1)[..., :ctx]  # [Hq, P, N]
        sparse = probs * key_sel
        sparse = sparse / sparse.sum(-1, keepdim=True).clamp_min(1e-30)
        v_rep = vals.repeat_interleave(group, dim=0)
        full_out = torch.bmm(probs, v_rep)
        sparse_out = torch.bmm(sparse, v_rep)
        err = (sparse_out - full_out).norm(dim=-1) / full_out.norm(dim=-1).clamp_min(1e-12)  # [Hq, P]
        self.topk_error[layer].append(err.reshape(hkv, group, p).mean(1).cpu())

        if self.search:
            causal = mask[None].expand(hq, -1, -1)
            for method in cfg.methods:
                if method == "hylra":
                    attended = _hylra_runtime_keys(qp, keys, pos, cfg, self.budget_blocks, ctx)
                else:
                    attended = _superlinear_keys(qp, keys, pos, self.span_params, bs)
                attended = attended & causal
                out = torch.bmm(torch.softmax(scores.masked_fill(~attended, float("-inf")), dim=-1), v_rep)
                m_err = (out - full_out).norm(dim=-1) / full_out.norm(dim=-1).clamp_min(1e-12)
                share = attended.sum(-1).float() / (pos + 1)[None].float()
                self.method_error[method][layer].append(m_err.reshape(hkv, group, p).mean(1).cpu())
                self.method_keys[method][layer].append(share.reshape(hkv, group, p).mean(1).cpu())

        if layer == self.num_layers - 1:
            self._accumulate_overlap()

    def _accumulate_overlap(self) -> None:
        sels = [self._selections.get(i) for i in range(self.num_layers)]
        self._selections = {}
        if any(s is None for s in sels):
            return
        s = torch.stack(sels).float()  # [L, Hkv, P, nb]
        inter = torch.einsum("ahpn,bhpn->habp", s, s)  # |S_a & S_b|, [Hkv, L, L, P]
        size = s.sum(-1).permute(1, 0, 2)  # [Hkv, L, P]
        ratio = (inter / size[:, None, :, :].clamp_min(1)).sum(-1)  # / |S_b|, summed over probes
        self.overlap_sum = ratio if self.overlap_sum is None else self.overlap_sum + ratio
        self.num_probes += s.shape[2]

    def results(self) -> dict[str, Any]:
        if self.num_probes == 0:
            raise ProfileError("no probe query was reached: the calibration text is shorter than the minimum "
                               f"probe context ({self.cfg.probe_context} tokens); use a longer text or a "
                               "smaller --topk-tokens")
        per_head_overlap = (self.overlap_sum / self.num_probes).cpu().double()  # [Hkv, L, L]
        mass_share = torch.stack([torch.cat(x, dim=1).mean(1) for x in self.mass_share]).double()  # [L, Hkv]
        topk_error = torch.stack([torch.cat(x, dim=1).mean(1) for x in self.topk_error]).double()
        per_layer = lambda acc: np.array([float(torch.cat(x, dim=1).mean()) for x in acc])  # noqa: E731
        return {"overlap": per_head_overlap.amin(0).clamp(0, 1).numpy(),
                "overlap_mean_heads": per_head_overlap.mean(0).numpy(),
                "mass_share": mass_share.numpy(), "topk_error": topk_error.numpy(),
                "num_probes": self.num_probes,
                "method_error": {m: per_layer(a) for m, a in self.method_error.items()} if self.search else {},
                "method_keys": {m: per_layer(a) for m, a in self.method_keys.items()} if self.search else {}}


def _hylra_runtime_keys(qp: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, cfg: ProfileConfig,
                        budget_blocks: int, ctx: int) -> torch.Tensor:
    """The keys HyLRA attends at run time for each probe query (decode-like: one query per selection):
    sinks + recent blocks + the blocks of highest q . mean key (max over the GQA group's heads) up to the
    budget. qp [Hq, P, D], keys [Hkv, N, D] -> [Hq, P, N] bool."""
    bs = cfg.block_size
    hq, p, _ = qp.shape
    hkv = keys.shape[0]
    nb = -(-ctx // bs)
    padded = torch.nn.functional.pad(keys, (0, 0, 0, nb * bs - ctx))
    fill = torch.full((nb,), bs, device=keys.device)
    fill[-1] = ctx - (nb - 1) * bs
    kmean = padded.reshape(hkv, nb, bs, -1).sum(2) / fill[None, :, None]  # [Hkv, nb, D]
    score = torch.bmm(qp.reshape(hkv, -1, qp.shape[-1]), kmean.transpose(1, 2)).reshape(hkv, hq // hkv, p, nb)
    score = score.amax(1)  # [Hkv, P, nb]
    block_ids = torch.arange(nb, device=keys.device)
    last = (pos // bs)[:, None]
    forced = (block_ids[None] < cfg.sink_blocks) | ((block_ids[None] > last - cfg.recent_blocks)
                                                    & (block_ids[None] <= last))
    ranked = torch.where(forced[None], float("inf"), score).masked_fill(block_ids[None, None] > last[None],
                                                                         float("-inf"))
    take = torch.clamp(pos // bs + 1, max=max(budget_blocks, cfg.sink_blocks + cfg.recent_blocks))
    rank = torch.empty_like(block_ids.expand(hkv, p, nb).contiguous())
    rank.scatter_(-1, ranked.argsort(dim=-1, descending=True), block_ids.expand(hkv, p, nb).contiguous())
    selected = (rank < take[None, :, None]).repeat_interleave(hq // hkv, dim=0)  # [Hq, P, nb]
    return selected.repeat_interleave(bs, dim=-1)[..., :ctx]


def _superlinear_keys(qp: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, params: Any, block_size: int
                      ) -> torch.Tensor:
    """The keys superlinear attends for each probe query with its run-time search (window + the selected
    spans, over block bounds of block_size keys for summary search). -> [Hq, P, N] bool."""
    from longserve.kernels.reference import superlinear as sl

    sel, sw_start = sl.select_spans(qp, keys, pos, params, block_size=block_size)
    key = torch.arange(keys.shape[1], device=keys.device)
    window = (key[None, :] >= sw_start[:, None]) & (key[None, :] <= pos[:, None])  # [P, N]
    in_span = sel.valid[..., None] & (key >= sel.starts[..., None]) & (key <= sel.ends[..., None])
    return window[None] | in_span.any(2)


def _causal_sdpa(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, seq: int) -> torch.Tensor:
    """Dense causal attention of one sequence's step queries [M, Hq, D] over its cache, with torch's fused
    attention (several times faster on CPU than the float32 reference, which the runtime tests cover)."""
    ctx = meta.context_lens_cpu[seq]
    keys = ref_dense.gather_kv(cache.k, meta.block_tables[seq], ctx)  # [Hkv, N, D]
    vals = ref_dense.gather_kv(cache.v, meta.block_tables[seq], ctx)
    group = q.shape[1] // keys.shape[0]
    keys, vals = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)
    pos = torch.arange(ctx - q.shape[0], ctx, device=q.device)
    mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None].to(q.dtype),
                                                           vals[None].to(q.dtype), attn_mask=mask[None, None])
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------------------------- running the model
def run_model(model: Any, token_ids: list[int], backend: RecordingBackend, num_layers: int, num_kv_heads: int,
              head_dim: int, device: torch.device, dtype: torch.dtype, cfg: ProfileConfig,
              on_tokens: Callable[[int], None] = lambda n: None) -> None:
    """One sequence through the model in prefill chunks over a fresh paged cache."""
    bs = cfg.block_size
    nb = -(-len(token_ids) // bs)
    shape = (nb, num_kv_heads, bs, head_dim)
    caches = [LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(num_layers)]
    table = torch.arange(nb)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    for start in range(0, len(token_ids), cfg.chunk_tokens):
        end = min(len(token_ids), start + cfg.chunk_tokens)
        meta = AttentionMetadata.for_step([table], [end], [end - start], bs, device)
        with torch.inference_mode():
            model(ids[start:end], meta.positions, caches, meta, backend, StepState())
        on_tokens(end - start)


def choose_full_layers(topk_error: np.ndarray, mass_share: np.ndarray, count: int) -> list[int]:
    """The `count` layers losing the most under the budget (mean over KV heads), mass_share breaking ties."""
    err = topk_error.mean(axis=1)
    share = mass_share.mean(axis=1)
    order = sorted(range(len(err)), key=lambda i: (-err[i], -share[i], i))
    return sorted(order[:count])


def build_policy(results: dict[str, Any], cfg: ProfileConfig, model_info: dict[str, Any],
                 extra_profile: dict[str, Any] | None = None) -> AttentionPlan:
    """FULL layers from sensitivity, the rest by the DP; the policy with its profile figures."""
    overlap = results["overlap"]
    num_layers = overlap.shape[0]
    full = choose_full_layers(results["topk_error"], results["mass_share"], cfg.num_full(num_layers))
    non_full = num_layers - len(full)
    cap = cfg.max_compute_layers if cfg.max_compute_layers is not None else max(1, math.ceil(non_full / 2))
    solved = dp.solve(overlap, full, cap)
    r4 = lambda x: [round(float(v), 4) for v in x]  # noqa: E731
    profile = {
        "tool": "longserve profile",
        "config": {k: v for k, v in asdict(cfg).items()},
        "num_probes": int(results["num_probes"]),
        "full_layers": full,
        "sensitivity": {
            "topk_error": r4(results["topk_error"].mean(axis=1)),
            "mass_share_90": r4(results["mass_share"].mean(axis=1)),
            "topk_error_per_kv_head": [r4(row) for row in results["topk_error"]],
        },
        "overlap": [r4(row) for row in overlap],
        "overlap_mean_over_heads": [r4(row) for row in results["overlap_mean_heads"]],
        "dp": {"max_compute_layers": cap, "num_compute": solved.num_compute,
               "min_overlap": round(solved.min_overlap, 4), "sum_overlap": round(solved.sum_overlap, 4),
               "objective": "lexicographic (min, sum) over non-full layers; compute layers count 1"},
        **(extra_profile or {}),
    }
    # per_head false: the profile measures one selection per KV head (its overlap and selections are per group).
    params = {"topk_tokens": cfg.topk_tokens, "sink_blocks": cfg.sink_blocks, "recent_blocks": cfg.recent_blocks,
              "per_head": False}
    if not results.get("method_error"):
        return solved.to_plan("hylra", params, model_info, profile)
    return _method_search_policy(results, cfg, model_info, profile, params)


def choose_methods(error: dict[str, np.ndarray], attended: dict[str, np.ndarray], max_error: float,
                   layers: list[int]) -> dict[int, str]:
    """Per layer: the method attending the fewest keys among those whose output error is at most max_error;
    when none is, the method of lowest error."""
    out = {}
    for i in layers:
        good = [m for m in error if error[m][i] <= max_error]
        out[i] = min(good, key=lambda m: (attended[m][i], error[m][i])) if good else \
            min(error, key=lambda m: error[m][i])
    return out


def _method_search_policy(results: dict[str, Any], cfg: ProfileConfig, model_info: dict[str, Any],
                          profile: dict[str, Any], hylra_params: dict[str, Any]) -> AttentionPlan:
    """FULL layers: those the best candidate method serves worst (lowest error over the methods, highest
    first); every other layer its method by choose_methods; the DP (COMPUTE/REUSE) over the HyLRA layers."""
    error, attended = results["method_error"], results["method_keys"]
    num_layers = results["overlap"].shape[0]
    best = np.min(np.stack([error[m] for m in cfg.methods]), axis=0)
    share = results["mass_share"].mean(axis=1)
    full = sorted(sorted(range(num_layers), key=lambda i: (-best[i], -share[i], i))[:cfg.num_full(num_layers)])
    chosen = choose_methods(error, attended, cfg.max_error, [i for i in range(num_layers) if i not in full])
    hylra_layers = [i for i, m in chosen.items() if m == "hylra"]
    cap = cfg.max_compute_layers if cfg.max_compute_layers is not None else max(1, math.ceil(len(hylra_layers) / 2))
    others = [i for i in range(num_layers) if i not in hylra_layers]
    solved = dp.solve(results["overlap"], others, cap) if hylra_layers else None
    plan_method = "hylra" if hylra_layers else chosen[min(chosen)] if chosen else "dense"
    layers = []
    for i in range(num_layers):
        m = chosen.get(i)
        if m is None:
            layers.append(LayerPlan("full"))
        elif m == "hylra":
            layers.append(solved.layers[i])
        else:
            layers.append(LayerPlan("compute", method=None if m == plan_method else m))
    r4 = lambda x: [round(float(v), 4) for v in x]  # noqa: E731
    profile["full_layers"] = full
    if solved is not None:
        profile["dp"].update(max_compute_layers=cap, num_compute=solved.num_compute,
                             min_overlap=round(solved.min_overlap, 4), sum_overlap=round(solved.sum_overlap, 4))
    else:
        profile["dp"] = {"num_compute": 0, "note": "no HyLRA layer"}
    profile["methods"] = {
        "candidates": list(cfg.methods), "max_error": cfg.max_error,
        "rule": "per layer the method attending the fewest keys among those with output error <= max_error "
                "(else the lowest error); FULL: the layers whose best method errs most",
        "output_error": {m: r4(error[m]) for m in cfg.methods},
        "attended_share": {m: r4(attended[m]) for m in cfg.methods},
        "chosen": [chosen.get(i, "dense") for i in range(num_layers)],
    }
    # Every parameter written out (defaults resolved), so the policy keeps what was profiled if defaults change.
    resolved = {"hylra": lambda: hylra_validate(hylra_params),
                "superlinear": lambda: asdict(span_params(cfg.method_params.get("superlinear")))}
    method_params = {m: resolved[m]() for m in set(chosen.values()) | {plan_method} if m in resolved}
    plan = AttentionPlan(plan_method, layers, method_params.pop(plan_method, {}), model_info, profile, method_params)
    plan.validate()
    return plan


# ---------------------------------------------------------------------------------- plots
def draw_plots(plan: AttentionPlan, plots_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(plots_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = plan.profile
    overlap = np.array(prof["overlap"])
    n = overlap.shape[0]
    modes = [lp.mode[0].upper() + (str(lp.source) if lp.source is not None else "") for lp in plan.layers]

    fig, ax = plt.subplots(figsize=(7 + n * 0.12, 6 + n * 0.1))
    im = ax.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"Top-k overlap O[i][j] (budget {plan.params.get('topk_tokens')} tokens, min over KV heads)")
    ax.set_xlabel("j (layer whose selection is reused)")
    ax.set_ylabel("i (layer served)")
    ax.set_xticks(range(n), [f"{j}" for j in range(n)], fontsize=7)
    ax.set_yticks(range(n), [f"{i} {m}" for i, m in enumerate(modes)], fontsize=7)
    for i, lp in enumerate(plan.layers):
        if lp.mode == "reuse":
            ax.plot(lp.source, i, marker="s", markersize=6, markerfacecolor="none", markeredgecolor="red")
    fig.colorbar(im, ax=ax, label="mean |TopK_i & TopK_j| / |TopK_j|")
    fig.tight_layout()
    heat = out_dir / "overlap.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)

    sens = prof["sensitivity"]
    x = np.arange(n)
    colors = {"full": "tab:red", "compute": "tab:blue", "reuse": "tab:green"}
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8 + n * 0.1, 6), sharex=True)
    a1.bar(x, sens["topk_error"], color=[colors[lp.mode] for lp in plan.layers])
    a1.set_ylabel("output error under top-k")
    a1.set_title("Per-layer sensitivity (red: FULL, blue: COMPUTE, green: REUSE)")
    a2.bar(x, sens["mass_share_90"], color=[colors[lp.mode] for lp in plan.layers])
    a2.set_ylabel("share of blocks for 90% mass")
    a2.set_xlabel("layer")
    a2.set_xticks(x, [str(i) for i in x], fontsize=7)
    fig.tight_layout()
    sens_path = out_dir / "sensitivity.png"
    fig.savefig(sens_path, dpi=110)
    plt.close(fig)
    return [heat, sens_path]


# ---------------------------------------------------------------------------------- the whole command
def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", desc="profiling", file=sys.stderr, dynamic_ncols=True)


def profile_model(loaded: Any, calib_path: str | Path, cfg: ProfileConfig, device: torch.device,
                  dtype: torch.dtype, progress: bool = True) -> AttentionPlan:
    """Profile an already loaded model (LoadedModel: model, tokenizer, config) and return the policy."""
    cfg.validate()
    started = time.time()
    config = loaded.config
    num_layers, hkv, head_dim = config.num_layers, config.num_kv_heads, config.head_dim
    docs = read_calibration(calib_path)
    if loaded.tokenizer is None:
        raise ProfileError("the model has no tokenizer to encode the calibration text")
    pieces = []
    total_tokens = 0
    for text in docs:
        ids = encode(loaded.tokenizer, text)
        total_tokens += len(ids)
        max_len = min(cfg.max_seq_tokens, getattr(config, "max_position_embeddings", None) or cfg.max_seq_tokens)
        pieces.extend(ids[i:i + max_len] for i in range(0, len(ids), max_len))
    usable = [p for p in pieces if len(p) >= cfg.probe_context + cfg.probe_every - 1]
    if not usable:
        longest = max((len(p) for p in pieces), default=0)
        raise ProfileError(f"calibration text too short: its longest piece has {longest} tokens, the profile "
                           f"needs at least {cfg.probe_context + cfg.probe_every - 1} (2 x --topk-tokens); "
                           "use a longer text or a smaller --topk-tokens")
    backend = RecordingBackend(num_layers, cfg)
    bar = _progress(sum(len(p) for p in usable), progress)
    for piece in usable:
        run_model(loaded.model, piece, backend, num_layers, hkv, head_dim, device, dtype, cfg,
                  on_tokens=(bar.update if bar is not None else (lambda n: None)))
    if bar is not None:
        bar.close()
    results = backend.results()
    calib = Path(calib_path)
    extra = {"calibration": {"file": calib.name, "sha256": hashlib.sha256(calib.read_bytes()).hexdigest(),
                             "documents": len(docs), "tokens": total_tokens,
                             "tokens_profiled": sum(len(p) for p in usable)},
             "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "elapsed_s": round(time.time() - started, 1)}
    return build_policy(results, cfg, config.model_info(), extra)


def profile(model: str | None, calib_path: str | Path, out_path: str | Path, cfg: ProfileConfig,
            plots_dir: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
            progress: bool = True) -> AttentionPlan:
    """`longserve profile`: load the model, profile, write the policy JSON (and plots)."""
    from longserve.engine.loader import load_model

    cfg.validate()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ProfileError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    read_calibration(calib_path)  # fail on a bad file before the (slower) model load
    loaded = load_model(model, dev, torch_dtype)
    plan = profile_model(loaded, calib_path, cfg, dev, torch_dtype, progress)
    out = Path(out_path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    if plots_dir is not None:
        draw_plots(plan, plots_dir)
    return plan
