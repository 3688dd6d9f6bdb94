"""`longserve bench throughput`: decode and prefill speed at long context for every attention method.

For each context length, one paged KV cache is allocated and filled (random keys/values with --kv synthetic,
a real chunked prefill with --kv prefill); then every attention method runs the same work on it:
  decode   warm-up steps, then --decode-steps steps, each timed on its own, for each --batch size (greedy,
           logits included); the median step is reported (with mean, min and max)
  prefill  --prefill-tokens new tokens appended after the context, in chunks of --prefill-chunk (timed)
The model's non-attention part is timed once per batch size with an attention backend that does nothing; the
attention share of a step is 1 - that (median) time / the median step time.

Batch sequences share the context's blocks by default (as sequences with a common cached prefix do), so batch 8
at 1M tokens needs one 1M-token cache, not eight; each sequence decodes into its own blocks. With
--separate-contexts every sequence gets its own copy (memory grows with the batch).

Nothing is allocated before a memory check: the weights, the KV cache (with the methods' per-block tables) and a
work-space estimate must fit in the device's free memory (CUDA: mem_get_info; CPU: MemAvailable and the cgroup
limit), otherwise the command exits with one line saying what is needed, what is available and what to change.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.errors import EngineError
from ..engine.llm_engine import resolve_device as engine_resolve_device
from ..engine.models.decoder import DecoderModel, ModelConfig
from ..kernels.base import AttentionMetadata, BackendError, LayerCache, StepState
from ..kernels.plan import AttentionPlan
from ..kernels.reference.block_summaries import summarize_full_blocks
from ..kernels.registry import METHODS, build_backend
from .common import BenchError, format_tokens
from .presets import PRESETS, preset_config, random_model, weight_count

GiB = 1 << 30
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
SYNTHETIC_NOTE = ("synthetic KV: the context's keys/values are random normal values written straight into the "
                  "paged cache (no prompt was prefilled); the methods' per-block tables are rebuilt from them")
SHARED_NOTE = "batch sequences share the context's KV blocks (as a cached common prefix); each decodes into its own"


# ------------------------------------------------------------------------------------------ memory check

@dataclass
class MemoryNeed:
    weights: int
    kv: int
    aux: int
    workspace: int
    per_layer: int  # what one more (or one fewer) layer costs: its weights, KV and aux

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.aux + self.workspace


@dataclass
class Layout:
    """Physical blocks of one context length: the context region(s), then each sequence's private blocks."""

    context: int  # tokens, a whole number of blocks
    block_size: int
    context_regions: int  # 1 (shared by the batch) or max batch (separate contexts)
    max_batch: int
    private_per_seq: int  # blocks each decoding sequence writes its new tokens into
    prefill_blocks: int  # blocks of the --prefill-tokens sequence

    @property
    def context_blocks(self) -> int:
        return self.context // self.block_size

    @property
    def num_blocks(self) -> int:
        return self.context_blocks * self.context_regions + self.max_batch * self.private_per_seq + self.prefill_blocks

    def context_table(self, seq: int) -> torch.Tensor:
        region = seq if self.context_regions > 1 else 0
        start = region * self.context_blocks
        return torch.arange(start, start + self.context_blocks, dtype=torch.int32)

    def private_table(self, seq: int) -> torch.Tensor:
        start = self.context_blocks * self.context_regions + seq * self.private_per_seq
        return torch.arange(start, start + self.private_per_seq, dtype=torch.int32)

    def prefill_table(self) -> torch.Tensor:
        start = self.context_blocks * self.context_regions + self.max_batch * self.private_per_seq
        return torch.arange(start, start + self.prefill_blocks, dtype=torch.int32)

    def decode_table(self, seq: int) -> torch.Tensor:
        return torch.cat([self.context_table(seq), self.private_table(seq)])


def make_layout(context: int, block_size: int, args) -> Layout:
    context = -(-context // block_size) * block_size
    max_batch = max(args.batch)
    private = -(-(args.warmup_steps + args.decode_steps) // block_size)
    prefill = -(-args.prefill_tokens // block_size) if args.prefill_tokens else 0
    return Layout(context, block_size, max_batch if args.separate_contexts else 1, max_batch, private, prefill)


def aux_bytes_per_block(specs: dict, dtype: torch.dtype) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * (torch.empty((), dtype=dt).element_size() if dt is not None else elt)
               for shape, dt in specs.values())


def memory_need(config: ModelConfig, dtype: torch.dtype, device: torch.device, layout: Layout,
                aux_per_block: int, args) -> MemoryNeed:
    elt = torch.empty((), dtype=dtype).element_size()
    kv_per_block_layer = 2 * config.num_kv_heads * layout.block_size * config.head_dim * elt
    n = layout.num_blocks
    weights = weight_count(config) * elt
    layer_weights = (weight_count(replace(config, num_layers=config.num_layers + 1)) - weight_count(config)) * elt
    kv = n * kv_per_block_layer * config.num_layers
    aux = n * aux_per_block * config.num_layers
    # Work space of one step. The PyTorch reference paths (CPU) gather a sequence's whole context (keys and
    # values, in float32) and build float32 scores over it; the Triton paths need little beyond activations.
    ctx = layout.context + layout.private_per_seq * layout.block_size
    tokens = max(max(args.batch), min(args.prefill_chunk, args.prefill_tokens or 0), 1)
    # float32-sized activations of the step's tokens (norms, q/k/v with RoPE in float32, the MLP's gate/up),
    # logits only for the sampled rows.
    activations = (tokens * (6 * config.hidden_size + 4 * config.intermediate_size + 2 * config.q_size) * 4
                   + max(args.batch) * config.vocab_size * 8)
    if device.type == "cuda":
        workspace = GiB + activations
    else:
        gathered = 4 * ctx * config.num_kv_heads * config.head_dim * 4
        scores = 4 * config.num_heads * ctx * 4
        workspace = GiB // 2 + gathered + scores + activations + (512 << 20 if args.prefill_tokens else 0)
    per_layer = layer_weights + n * (kv_per_block_layer + aux_per_block)
    return MemoryNeed(weights, kv, aux, workspace, per_layer)


def available_memory(device: torch.device) -> int:
    """Bytes free for this run: CUDA free memory, or the host's MemAvailable capped by a cgroup limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 1 << 62
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text().strip()))
            break
        except (OSError, ValueError):
            continue
    return int(avail)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / GiB:.2f} GiB"


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, args, aux_per_block: int,
               block_size: int, available: int) -> None:
    """Raise BenchError (one line) unless the largest configuration fits; nothing has been allocated yet."""
    for context in sorted(args.context, reverse=True):
        layout = make_layout(context, block_size, args)
        need = memory_need(config, dtype, device, layout, aux_per_block, args)
        if need.total <= available:
            continue
        hints = []
        spare = available - (need.total - config.num_layers * need.per_layer)
        fit_layers = int(spare // need.per_layer) if need.per_layer > 0 else 0
        if fit_layers >= 1:
            hints.append(f"--num-layers {fit_layers} (of {config.num_layers}) fits")
        else:
            hints.append("even --num-layers 1 does not fit at this context")
        fit_ctx = _largest_fitting_context(config, dtype, device, args, aux_per_block, block_size, available)
        hints.append(f"--context {format_tokens(fit_ctx)} fits" if fit_ctx else "no context fits with these weights")
        if dtype == torch.float32:
            hints.append("--dtype bf16 halves the weights and the KV cache")
        if max(args.batch) > 1 and args.separate_contexts:
            hints.append("or drop --separate-contexts / lower --batch")
        raise BenchError(
            f"{format_tokens(layout.context)} tokens of context x batch {max(args.batch)} on {device.type} needs "
            f"{_gib(need.total)} (weights {_gib(need.weights)} + KV cache {_gib(need.kv + need.aux)} + work space "
            f"{_gib(need.workspace)}) but {_gib(available)} is available; change --context, --batch or "
            f"--num-layers: {'; '.join(hints)}")


def _largest_fitting_context(config, dtype, device, args, aux_per_block, block_size, available) -> int:
    lo, hi = 0, max(args.context)
    while hi - lo > block_size:
        mid = (lo + hi) // 2
        need = memory_need(config, dtype, device, make_layout(mid, block_size, args), aux_per_block, args)
        lo, hi = (mid, hi) if need.total <= available else (lo, mid)
    unit = max(block_size, 1024) if lo >= 1024 else block_size  # a round figure, printed as e.g. 1166K
    return lo // unit * unit




# ------------------------------------------------------------------------------------------- the model

def resolve_device(name: str) -> torch.device:
    try:
        dev = engine_resolve_device(name)
    except EngineError as e:
        raise BenchError(str(e)) from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {name!r} (expected cpu or cuda)")
    return dev


def model_config(model: str, num_layers: int | None) -> tuple[ModelConfig, str, Path | None]:
    """(config, description, checkpoint path or None for a preset)."""
    if model in PRESETS:
        return preset_config(model, num_layers), f"preset {model} (random weights)", None
    from ..engine.loader import resolve_model_path

    if not Path(model).expanduser().exists() and "/" not in model and not model.startswith("."):
        from ..engine.loader import is_default_model
        if not is_default_model(model):
            raise BenchError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}), the default model "
                             "nor an existing checkpoint directory")
    path = resolve_model_path(model)
    config = ModelConfig.from_pretrained(path)
    if num_layers is not None:
        if num_layers > config.num_layers:
            raise BenchError(f"--num-layers {num_layers} exceeds the checkpoint's {config.num_layers} layers")
        config = replace(config, num_layers=num_layers)
    return config, f"checkpoint {path}", path


def load_checkpoint(path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> DecoderModel:
    """The checkpoint's first config.num_layers layers (all of them unless --num-layers cut them)."""
    from safetensors import safe_open

    from ..engine.loader import safetensors_files

    net = DecoderModel(config, device=device, dtype=dtype)

    def tensors():
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    m = re.match(r"model\.layers\.(\d+)\.", name)
                    if m and int(m.group(1)) >= config.num_layers:
                        continue
                    yield name, f.get_tensor(name)

    loaded = net.load_weights(tensors())
    missing = net.missing_tensors(loaded)
    if missing:
        raise BenchError(f"checkpoint {path} lacks tensors {', '.join(missing[:3])}")
    return net.eval()


# --------------------------------------------------------------------------------------- measurement

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NullAttention:
    """Does no attention work: times the rest of the model (projections, MLP, norms, logits)."""

    name = "none"

    def aux_specs(self, num_kv_heads: int, head_dim: int) -> dict:
        return {}

    def forward(self, layer_idx, q, k, v, cache, meta, state) -> torch.Tensor:
        return torch.zeros_like(q)

    def free_sequence(self, seq_id: int) -> None:
        pass


def _progress(total: int, desc: str, unit: str = "it"):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs and CI.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


def fill_synthetic(caches: list[LayerCache], num_blocks: int, seed: int) -> None:
    """Random normal keys/values in blocks [0, num_blocks) of every layer, chunk by chunk (no per-block loop)."""
    gen = torch.Generator(device=caches[0].k.device).manual_seed(seed)
    per_block = caches[0].k[0].numel()
    chunk = max(1, (1 << 26) // per_block)  # about 64M elements per call
    steps = [(s, min(num_blocks, s + chunk)) for s in range(0, num_blocks, chunk)]
    with _progress(len(caches) * len(steps) * 2, "filling synthetic KV") as bar:
        for cache in caches:
            for tensor in (cache.k, cache.v):
                for s, e in steps:
                    tensor[s:e].normal_(generator=gen)
                    bar.update()


def rebuild_aux(backend, layer_idx: int, cache: LayerCache, num_blocks: int) -> str:
    """Make a method's per-block tables describe blocks [0, num_blocks) that were written directly.

    Uses the method's own `prepare_synthetic(layer_idx, cache, num_blocks)` when it has one; otherwise
    rebuilds the key-bound tables kmin/kmax (the elementwise min/max of each block's keys, as both HyLRA and
    superlinear's summary search define them). Returns how the tables were made; raises BenchError for
    tables it does not know how to rebuild."""
    if not cache.aux:
        return "none"
    layer_backend = getattr(backend, "layer_backend", None)  # a plan's layers may run different methods
    method = layer_backend(layer_idx) if layer_backend is not None else getattr(backend, "method", None)
    if getattr(method, "name", None) == "dense":
        return "none"  # a full layer of a sparse plan never reads its tables
    hook = getattr(method, "prepare_synthetic", None)
    if hook is not None:
        hook(layer_idx, cache, num_blocks)
        return "prepare_synthetic"
    specs = getattr(method, "aux_specs", None)  # the tables this layer's method reads (a plan allocates the union)
    needed = set(specs(cache.num_kv_heads, cache.head_dim)) if specs is not None else set(cache.aux)
    if not needed:
        return "none"
    unknown = needed - {"kmin", "kmax"}
    if unknown:
        raise BenchError(f"{backend.name}: cannot rebuild aux tables {sorted(unknown)} for a synthetic cache "
                         "(the backend has no prepare_synthetic hook); use --kv prefill")
    summarize_full_blocks(cache.k, {name: cache.aux[name] for name in needed}, num_blocks)
    return "kmin/kmax rebuilt from the keys"


def allocate_aux(caches: list[LayerCache], specs: dict, num_blocks: int, dtype: torch.dtype) -> list[LayerCache]:
    out = []
    for cache in caches:
        aux = {name: torch.zeros((num_blocks, *shape), dtype=dt or dtype, device=cache.k.device)
               for name, (shape, dt) in specs.items()}
        out.append(LayerCache(cache.k, cache.v, aux))
    return out


class Runner:
    """Drives the model over hand-built batches on one paged cache (no scheduler: only the timed work)."""

    def __init__(self, model: DecoderModel, config: ModelConfig, device: torch.device, layout: Layout):
        self.model = model
        self.config = config
        self.device = device
        self.layout = layout
        self.bs = layout.block_size

    def tables(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [S, width] int32 on the host and on the device (built once per batch, not per step)."""
        width = max(len(r) for r in rows)
        cpu = torch.zeros((len(rows), width), dtype=torch.int32)
        for i, r in enumerate(rows):
            cpu[i, :len(r)] = r
        return cpu, cpu.to(self.device)

    def _meta(self, tables: tuple[torch.Tensor, torch.Tensor], starts: list[int], lens: list[int],
              seq_ids: list[int]) -> AttentionMetadata:
        bs = self.bs
        table_cpu, table_dev = tables
        positions = torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in zip(starts, lens)])
        rows = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        slots = table_cpu[rows, positions // bs].long() * bs + positions % bs
        qsl = [0]
        for n in lens:
            qsl.append(qsl[-1] + n)
        ctx = [s + n for s, n in zip(starts, lens)]
        dev = self.device
        return AttentionMetadata(
            positions=positions.to(dev), slot_mapping=slots.to(dev), block_tables=table_dev,
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev), block_size=bs,
            context_lens_cpu=ctx, query_lens_cpu=list(lens), seq_ids=list(seq_ids))

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, meta: AttentionMetadata, caches, backend, sample: bool) -> torch.Tensor:
        hidden = self.model(input_ids, meta.positions, caches, meta, backend, StepState())
        if not sample:
            return hidden
        last = (meta.query_start_loc[1:] - 1).long()
        return self.model.compute_logits(hidden[last]).argmax(dim=-1)

    def decode(self, caches, backend, batch: int, warmup: int, steps: int, seed: int
               ) -> tuple[list[float], int | None]:
        """(seconds of each of `steps` decode steps of `batch` tokens after `warmup` untimed steps, bytes of
        per-sequence state the method holds, if it reports them through state_bytes())."""
        lay = self.layout
        tables = self.tables([lay.decode_table(b) for b in range(batch)])
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.config.vocab_size, (batch,), generator=gen).to(self.device)
        pos = lay.context
        with _progress(warmup + steps, f"{backend.name}: decode batch {batch}", unit="step") as bar:
            for _ in range(warmup):
                ids = self.step(ids, self._meta(tables, [pos] * batch, [1] * batch, list(range(batch))), caches,
                                backend, sample=True)
                pos += 1
                bar.update()
            times = []
            for _ in range(steps):
                # Each step timed on its own (the engine, too, waits for every step's sampled tokens), so the
                # median resists a step slowed by another process.
                synchronize(self.device)
                t0 = time.perf_counter()
                ids = self.step(ids, self._meta(tables, [pos] * batch, [1] * batch, list(range(batch))), caches,
                                backend, sample=True)
                synchronize(self.device)
                times.append(time.perf_counter() - t0)
                pos += 1
                bar.update()
        state_bytes = getattr(backend, "state_bytes", None)
        state_bytes = state_bytes() if callable(state_bytes) else None
        for b in range(batch):
            backend.free_sequence(b)
        return times, state_bytes

    def prefill(self, caches, backend, table: torch.Tensor, start: int, tokens: int, chunk: int, seq_id: int,
                seed: int, desc: str) -> float:
        """Seconds to prefill `tokens` random tokens at positions start.. in chunks (the last chunk samples)."""
        gen = torch.Generator().manual_seed(seed)
        tables = self.tables([table])
        synchronize(self.device)
        t0 = time.perf_counter()
        with _progress(tokens, desc, unit="tok") as bar:
            pos = start
            while pos < start + tokens:
                n = min(chunk, start + tokens - pos)
                ids = torch.randint(0, self.config.vocab_size, (n,), generator=gen).to(self.device)
                meta = self._meta(tables, [pos], [n], [seq_id])
                self.step(ids, meta, caches, backend, sample=pos + n == start + tokens)
                pos += n
                bar.update(n)
        synchronize(self.device)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ peak memory

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process peak RSS (VmHWM, reset per measurement)"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS since start (getrusage)"


# ------------------------------------------------------------------------------------------- run

def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(name=name, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    return info


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for pkg in ("longserve", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_backends(methods: list[str], num_layers: int, params: dict, impl: str) -> tuple[dict, dict]:
    """(method -> backend for those that build, method -> reason for those that do not)."""
    available, missing = {}, {}
    for method in dict.fromkeys(methods):
        try:
            available[method] = build_backend(method, num_layers, params.get(method), impl=impl)
        except (BackendError, ImportError) as e:
            missing[method] = str(e) if method in METHODS else f"unknown method (known: {', '.join(METHODS)})"
    return available, missing


def policy_backends(paths: list[str], config: ModelConfig, params: dict, impl: str) -> dict:
    """policy:<file stem> -> the backend of each policy file (refused in one line when it does not fit the model)."""
    out = {}
    for path in paths:
        try:
            plan = AttentionPlan.load(path)
            plan.check_model(config.model_info())
            out[f"policy:{Path(path).stem}"] = build_backend(plan=plan, params=params, impl=impl)
        except BackendError as e:
            raise BenchError(f"--policy {path}: {e}") from None
    return out


def run(args) -> int:
    unknown = sorted(set(args.attention_config) - set(METHODS))
    if unknown:
        raise BenchError(f"--attention-config names unknown method(s) {', '.join(unknown)}")
    device = resolve_device(args.device)
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    block_size = args.block_size or (64 if device.type == "cuda" else 16)
    if block_size < 1 or block_size & (block_size - 1):
        raise BenchError(f"--block-size must be a power of two, got {block_size}")
    config, model_desc, ckpt = model_config(args.model, args.num_layers)
    policies = getattr(args, "policy", None) or []
    methods = args.attention or (["dense"] if policies else list(METHODS))
    backends, missing = build_backends(methods, config.num_layers, args.attention_config, args.attention_impl)
    backends.update(policy_backends(policies, config, args.attention_config, args.attention_impl))
    for method, reason in missing.items():
        print(f"{method}: not available ({reason})", file=sys.stderr)
    if not backends:
        raise BenchError("none of the requested attention methods is available")
    aux_per_block = max(aux_bytes_per_block(b.aux_specs(config.num_kv_heads, config.head_dim), dtype)
                        for b in backends.values())
    check_fits(config, dtype, device, args, aux_per_block, block_size, available_memory(device))

    torch.manual_seed(args.seed)
    model = load_checkpoint(ckpt, config, device, dtype) if ckpt else random_model(config, device, dtype, args.seed)
    elt = torch.empty((), dtype=dtype).element_size()
    print(f"model: {model_desc}, {config.num_layers} layers, {config.num_heads} query / {config.num_kv_heads} KV "
          f"heads of {config.head_dim}; device {device}; dtype {_dtype_name(dtype)}; block size {block_size}",
          file=sys.stderr)
    print(f"KV: {SYNTHETIC_NOTE if args.kv == 'synthetic' else 'prefilled for real (chunked) by each method'}",
          file=sys.stderr)

    results: list[dict[str, Any]] = []
    for context in args.context:
        layout = make_layout(context, block_size, args)
        results.extend(_run_context(model, config, device, dtype, layout, backends, args))

    _add_ratios(results)
    report = {
        "benchmark": "longserve bench throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "longserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None,
        "argv": list(sys.argv),
        "device": environment(device),
        "versions": versions(),
        "model": {"name": args.model, "source": model_desc, "config": _config_json(config),
                  "parameters": weight_count(config), "weights_bytes": weight_count(config) * elt},
        "dtype": _dtype_name(dtype),
        "block_size": block_size,
        "kv_mode": args.kv,
        "kv_note": SYNTHETIC_NOTE if args.kv == "synthetic" else "each method prefilled the context itself",
        "context_sharing": "separate" if args.separate_contexts else "shared",
        "context_sharing_note": None if args.separate_contexts else SHARED_NOTE,
        "attention_impl": args.attention_impl,
        "execution": "eager (no CUDA graphs); metadata built on the host every step, as the engine does",
        "attention_config": args.attention_config,
        "decode_steps": args.decode_steps,
        "warmup_steps": args.warmup_steps,
        "prefill_tokens": args.prefill_tokens,
        "prefill_chunk": args.prefill_chunk,
        "methods": list(backends),
        "unavailable": missing,
        "results": results,
    }
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plotting import plot_throughput

        try:
            plot_throughput(report, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except ImportError as e:  # a GPU image without matplotlib: the JSON still holds every figure
            print(f"no plot: {e} (pip install matplotlib)", file=sys.stderr)
            return 1
    failed = [r for r in results if r.get("error")]
    return 1 if failed and len(failed) == len(results) else 0


def _config_json(config: ModelConfig) -> dict:
    d = asdict(config)
    d["rope"] = config.rope.to_dict()
    return d


def _run_context(model, config, device, dtype, layout: Layout, backends: dict, args) -> list[dict]:
    runner = Runner(model, config, device, layout)
    shape = (layout.num_blocks, config.num_kv_heads, layout.block_size, config.head_dim)
    base = [LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)]
    elt = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * math.prod(shape) * elt * config.num_layers
    filled_blocks = layout.context_blocks * layout.context_regions
    if args.kv == "synthetic":
        fill_synthetic(base, filled_blocks, args.seed)

    # The non-attention part of a decode step, per batch size (the same for every method).
    null_step = {b: statistics.median(runner.decode(base, NullAttention(), b, 1, max(3, min(args.decode_steps, 8)),
                                                    args.seed)[0]) for b in args.batch}

    rows = []
    for method, backend in backends.items():
        specs = backend.aux_specs(config.num_kv_heads, config.head_dim)
        aux_bytes = aux_bytes_per_block(specs, dtype) * layout.num_blocks * config.num_layers
        common = {"context": layout.context, "method": method, "kv_cache_bytes": kv_bytes, "aux_bytes": aux_bytes}
        caches = None
        try:
            reset_peak(device)
            caches = allocate_aux(base, specs, layout.num_blocks, dtype)
            extra: dict[str, Any] = {}
            if args.kv == "synthetic":
                how = {rebuild_aux(backend, i, c, filled_blocks) for i, c in enumerate(caches)}
                extra["aux_tables"] = sorted(how - {"none"}) or ["none"]
            else:
                seconds = 0.0
                for region in range(layout.context_regions):
                    seq = region if layout.context_regions > 1 else 0
                    seconds += runner.prefill(caches, backend, layout.decode_table(seq),
                                              0, layout.context, args.prefill_chunk, seq, args.seed,
                                              f"{method}: prefilling context")
                    backend.free_sequence(seq)
                extra["context_prefill_tok_s"] = layout.context * layout.context_regions / seconds
            prefill_tok_s = None
            if args.prefill_tokens:
                seq_id = layout.max_batch
                seconds = runner.prefill(caches, backend,
                                         torch.cat([layout.context_table(0), layout.prefill_table()]),
                                         layout.context, args.prefill_tokens, args.prefill_chunk, seq_id, args.seed,
                                         f"{method}: prefill {args.prefill_tokens} tokens")
                backend.free_sequence(seq_id)
                prefill_tok_s = args.prefill_tokens / seconds
            for batch in args.batch:
                times, state_bytes = runner.decode(caches, backend, batch, args.warmup_steps, args.decode_steps,
                                                   args.seed)
                step = statistics.median(times)
                peak, how_peak = peak_memory(device)
                share = max(0.0, 1.0 - null_step[batch] / step) if step > 0 else None
                rows.append({**common, "batch": batch, "decode_ms_per_step": step * 1e3,
                             "decode_ms_mean": statistics.fmean(times) * 1e3, "decode_ms_min": min(times) * 1e3,
                             "decode_ms_max": max(times) * 1e3,
                             "decode_tok_s": batch / step, "attention_share": share,
                             "non_attention_ms_per_step": null_step[batch] * 1e3, "prefill_tok_s": prefill_tok_s,
                             "sequence_state_bytes": state_bytes,
                             "peak_memory_bytes": peak, "peak_memory_kind": how_peak, **extra})
                print(f"context {format_tokens(layout.context)} {method} batch {batch}: "
                      f"{step * 1e3:.2f} ms/step, {batch / step:.1f} tok/s", file=sys.stderr)
        except Exception as e:  # out of memory, a kernel missing or failing to compile: this method's rows say so
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            message = f"{type(e).__name__}: {first}" if first else type(e).__name__
            print(f"context {format_tokens(layout.context)} {method}: failed: {message}", file=sys.stderr)
            done = {r["batch"] for r in rows if r["method"] == method and r["context"] == layout.context}
            rows.extend({**common, "batch": b, "error": message} for b in args.batch if b not in done)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            del caches
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _add_ratios(results: list[dict]) -> None:
    dense = {(r["context"], r["batch"]): r for r in results if r["method"] == "dense" and not r.get("error")}
    for r in results:
        d = dense.get((r["context"], r["batch"]))
        if d is None or r.get("error"):
            continue
        r["decode_speedup_vs_dense"] = d["decode_ms_per_step"] / r["decode_ms_per_step"]
        if r.get("prefill_tok_s") and d.get("prefill_tok_s"):
            r["prefill_speedup_vs_dense"] = r["prefill_tok_s"] / d["prefill_tok_s"]


def format_table(report: dict) -> str:
    head = ["context", "batch", "method", "ms/step", "tok/s", "vs dense", "attn %", "prefill tok/s", "KV GiB",
            "peak GiB"]
    lines = []
    for r in report["results"]:
        if r.get("error"):
            lines.append([format_tokens(r["context"]), str(r["batch"]), r["method"], "failed: " + r["error"][:60]])
            continue
        ratio = r.get("decode_speedup_vs_dense")
        pf = r.get("prefill_tok_s")
        lines.append([
            format_tokens(r["context"]), str(r["batch"]), r["method"], f"{r['decode_ms_per_step']:.2f}",
            f"{r['decode_tok_s']:.1f}", f"{ratio:.2f}x" if ratio else "-",
            f"{100 * r['attention_share']:.0f}" if r.get("attention_share") is not None else "-",
            f"{pf:.0f}" if pf else "-", f"{(r['kv_cache_bytes'] + r['aux_bytes']) / GiB:.2f}",
            f"{r['peak_memory_bytes'] / GiB:.2f}"])
    widths = [max(len(h), *(len(l[i]) for l in lines if i < len(l))) if lines else len(h) for i, h in enumerate(head)]
    out = [f"# {report['model']['source']} on {report['device']['name']} ({report['dtype']}); "
           f"KV: {report['kv_mode']}" + (" (random keys/values, not a real prompt)" if report["kv_mode"] == "synthetic"
                                          else "") + f"; contexts {report['context_sharing']}"]
    out.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for l in lines:
        out.append("  ".join(c.rjust(w) for c, w in zip(l, widths)) if len(l) == len(head)
                   else "  ".join(c.rjust(w) for c, w in zip(l[:3], widths)) + "  " + l[3])
    for method, reason in report["unavailable"].items():
        out.append(f"{method}: not available ({reason})")
    return "\n".join(out)
