"""The one-shot GPU check suite: correctness of every Triton kernel, then timings against baselines.

    python -m longserve.bench.gpu_suite [--quick] [--json out.json] [--only SUBSTRING ...] [--checks-only]
    python bench/gpu_suite.py ...        (from a checkout that is not pip-installed; same options)

On an H100/H200 the full run fits in about 6 minutes (--budget-s, default 330 s, skips timing rows that
would not fit and says so). Without CUDA it runs the Triton interpreter (TRITON_INTERPRET=1, set here
before triton is imported) at tiny shapes: a smoke test of the suite's own code, not a measurement.

How kernels join the suite: put a module named bench/gpu_<something>.py beside this file; every such
module is imported on start, and registers its functions with the two decorators here:

    from .gpu_suite import CheckResult, SuiteContext, TimingRow, check, timing

    @check("hylra.topk")                     # yields CheckResult rows
    def check_topk(ctx: SuiteContext):
        ...
        yield ctx.compare("hylra.topk", "bf16 n=4096", out, ref, torch.bfloat16)

    @timing("hylra.decode", order=20)        # yields TimingRow rows; lower order runs earlier
    def time_topk(ctx: SuiteContext):
        ms = ctx.time_ms(lambda: kernel(...))
        yield TimingRow("hylra.decode", "1M tokens", ms, ...)

Checks all run before timings. A function that raises becomes a failed row (checks) or a row with the
error in its note (timings); the suite goes on. The exit code is 1 when any check failed.
The module must import on the GPU machine: torch, triton, numpy and this package only (no fastapi etc.).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: map the repo's folders under `longserve`
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _root)
    import longserve  # noqa: E402  (root/longserve/__init__.py)

    longserve.__path__.append(_root)  # longserve.kernels -> root/kernels, longserve.bench -> root/bench, ...
    __package__ = "longserve.bench"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pkgutil  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Iterable  # noqa: E402

import torch  # noqa: E402

# Relative error bounds ||out - ref|| / ||ref|| against a float64 reference from the same inputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class CheckResult:
    name: str
    case: str
    error: float  # relative error (nan when the output had NaN/inf or the check crashed)
    tolerance: float
    passed: bool
    detail: str = ""
    skipped: bool = False


@dataclass
class TimingRow:
    name: str
    case: str
    ms: float | None  # ours
    baseline: str = ""  # what we compare with, e.g. "sdpa-flash contiguous"
    baseline_ms: float | None = None
    bytes_moved: float | None = None  # fewest bytes the work must move (each input read once)
    flops: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def speed_ratio(self) -> float | None:
        """baseline time / our time: 1.0 = as fast as the baseline, 0.9 = 10% slower."""
        if self.ms and self.baseline_ms:
            return self.baseline_ms / self.ms
        return None

    @property
    def tbps(self) -> float | None:
        return self.bytes_moved / (self.ms * 1e-3) / 1e12 if self.ms and self.bytes_moved else None

    @property
    def baseline_tbps(self) -> float | None:
        return self.bytes_moved / (self.baseline_ms * 1e-3) / 1e12 if self.baseline_ms and self.bytes_moved else None

    @property
    def tflops(self) -> float | None:
        return self.flops / (self.ms * 1e-3) / 1e12 if self.ms and self.flops else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(speed_ratio=self.speed_ratio, tbps=self.tbps, baseline_tbps=self.baseline_tbps, tflops=self.tflops)
        return d


@dataclass
class _Entry:
    name: str
    fn: Callable[["SuiteContext"], Iterable]
    order: int


CHECKS: list[_Entry] = []
TIMINGS: list[_Entry] = []


def check(name: str, order: int = 100):
    """Register a correctness check: fn(ctx) yields CheckResult rows."""
    def deco(fn):
        CHECKS.append(_Entry(name, fn, order))
        return fn
    return deco


def timing(name: str, order: int = 100):
    """Register a timing: fn(ctx) yields TimingRow rows. Lower order runs earlier (what matters most first,
    so a tight budget drops the extras)."""
    def deco(fn):
        TIMINGS.append(_Entry(name, fn, order))
        return fn
    return deco


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; nan when out holds a NaN or inf (so it can never pass)."""
    out64 = out.detach().to(torch.float64)
    ref64 = ref.detach().to(torch.float64)
    if not bool(torch.isfinite(out64).all()):
        return float("nan")
    denom = float(ref64.norm())
    return float((out64 - ref64).norm()) / (denom if denom > 0 else 1.0)


class SuiteContext:
    """What check and timing functions get: the device, the mode, helpers to compare and to time."""

    def __init__(self, device: torch.device, quick: bool, budget_s: float, seed: int = 0, tiny: bool | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.quick = quick
        self.tiny = (not self.cuda) if tiny is None else tiny  # tiny shapes (always in the interpreter)
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.seed = seed
        self._draws = 0

    # --- inputs
    def generator(self) -> torch.Generator:
        """A fresh generator per call (a new seed each time, so every check draws fresh inputs)."""
        self._draws += 1
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self._draws)
        return g

    def dtypes(self) -> list[torch.dtype]:
        """Dtypes to check: bfloat16 is wrong in Triton's interpreter, so the CPU run checks float16."""
        return [torch.float32, torch.float16, torch.bfloat16] if self.cuda else [torch.float32, torch.float16]

    # --- results
    def compare(self, name: str, case: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                tolerance: float | None = None) -> CheckResult:
        tol = TOLERANCE[dtype] if tolerance is None else tolerance
        err = relative_error(out, ref)
        return CheckResult(name, case, err, tol, bool(err <= tol))  # nan <= tol is False

    # --- time
    def remaining_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], *, graph: bool = False, target_s: float = 0.5,
                max_reps: int = 100, min_reps: int = 3) -> float:
        """Median milliseconds of fn(). CUDA: warm-up first, then events around each call (or each replay
        of a CUDA graph holding one call, which removes launch gaps). CPU: wall clock, for smoke runs."""
        if not self.cuda:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        run = fn
        if graph:
            run = capture_graph(fn, self.device)
        for _ in range(2):  # warm-up (compilation happened in the capture or here)
            run()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(self.device)
        estimate = max(time.perf_counter() - t0, 1e-6)
        reps = int(max(min_reps, min(max_reps, target_s / estimate)))
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def capture_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """One call of fn captured in a CUDA graph; returns the replay. Warm-up runs on a side stream first,
    as torch requires (and so Triton compiles outside the capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ------------------------------------------------------------------------------------------- running

def discover() -> list[str]:
    """Import every bench/gpu_*.py module (they register checks and timings); returns import errors."""
    errors = []
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("gpu_") and info.name != "gpu_suite":
            try:
                importlib.import_module(f"{__package__}.{info.name}")
            except Exception as e:  # one broken module must not hide the others' results
                errors.append(f"{info.name}: {type(e).__name__}: {e}")
    return errors


def _selected(name: str, only: list[str] | None) -> bool:
    return not only or any(s in name for s in only)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def run_checks(ctx: SuiteContext, only: list[str] | None = None, echo: Callable[[str], None] = print
               ) -> list[CheckResult]:
    results: list[CheckResult] = []
    for entry in sorted(CHECKS, key=lambda e: e.order):
        if not _selected(entry.name, only):
            continue
        t0 = time.monotonic()
        try:
            for r in entry.fn(ctx):
                results.append(r)
                if r.skipped:
                    status = "skip"
                else:
                    status = "ok  " if r.passed else "FAIL"
                echo(f"  [{status}] {r.name:<24} {r.case:<46} err={r.error:.2e} tol={r.tolerance:.0e} {r.detail}")
        except Exception as e:
            results.append(CheckResult(entry.name, "crashed", float("nan"), 0.0, False, _one_line(e)))
            echo(f"  [FAIL] {entry.name:<24} crashed: {_one_line(e)}")
            echo(traceback.format_exc(limit=4))
        echo(f"  ({entry.name}: {time.monotonic() - t0:.1f}s)")
    return results


def run_timings(ctx: SuiteContext, only: list[str] | None = None, echo: Callable[[str], None] = print
                ) -> list[TimingRow]:
    rows: list[TimingRow] = []
    for entry in sorted(TIMINGS, key=lambda e: e.order):
        if not _selected(entry.name, only):
            continue
        t0 = time.monotonic()
        try:
            for row in entry.fn(ctx):
                rows.append(row)
                echo("  " + _format_row(row))
        except Exception as e:
            rows.append(TimingRow(entry.name, "crashed", None, note=_one_line(e)))
            echo(f"  {entry.name} crashed: {_one_line(e)}")
            echo(traceback.format_exc(limit=4))
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()
        echo(f"  ({entry.name}: {time.monotonic() - t0:.1f}s, {ctx.remaining_s():.0f}s of budget left)")
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


_ROW = "{:<18} {:<30} {:>10} {:>6} {:>7} | {:<16} {:>10} {:>6} | {:>6}  {}"


def _format_row(r: TimingRow) -> str:
    return _ROW.format(r.name, r.case, _fmt(r.ms, ".3f"), _fmt(r.tbps, ".2f"), _fmt(r.tflops, ".1f"), r.baseline,
                       _fmt(r.baseline_ms, ".3f"), _fmt(r.baseline_tbps, ".2f"), _fmt(r.speed_ratio, ".2f"), r.note)


def summary_table(checks: list[CheckResult], rows: list[TimingRow]) -> str:
    lines = []
    failed = [c for c in checks if not c.passed and not c.skipped]
    ran = [c for c in checks if not c.skipped]
    lines.append(f"checks: {len(ran) - len(failed)}/{len(ran)} passed"
                 + (f", {len(checks) - len(ran)} skipped" if len(checks) != len(ran) else ""))
    for c in failed:
        lines.append(f"  FAILED {c.name} {c.case}: err={c.error:.2e} tol={c.tolerance:.0e} {c.detail}")
    if rows:
        lines.append(_ROW.format("timing", "case", "ours ms", "TB/s", "TFLOP/s", "baseline", "ms", "TB/s",
                                 "ratio", "note (ratio = baseline time / ours)"))
        lines.extend(_format_row(r) for r in rows)
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # reported, not fatal
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="longserve GPU check suite: kernel checks and timings")
    parser.add_argument("--quick", action="store_true", help="fewer cases and shorter contexts")
    parser.add_argument("--json", metavar="PATH", help="write all results here")
    parser.add_argument("--only", nargs="*", metavar="SUBSTRING", help="run only entries whose name contains one")
    parser.add_argument("--checks-only", action="store_true", help="skip the timings")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="wall-clock budget; timing rows that would overrun it are skipped (default 330)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the inputs (default: from the clock)")
    args = parser.parse_args(argv)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            print("no CUDA and triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    ctx = SuiteContext(device, quick=args.quick or device.type != "cuda", budget_s=args.budget_s, seed=seed)
    env = environment(device)
    print(f"longserve GPU suite on {env.get('gpu', env['device'])} (torch {env['torch']}, triton {env['triton']}), "
          f"seed {seed}, {'quick' if ctx.quick else 'full'}{', tiny interpreter shapes' if ctx.tiny else ''}",
          flush=True)
    import_errors = discover()
    checks: list[CheckResult] = [CheckResult("import", err, float("nan"), 0.0, False) for err in import_errors]
    for err in import_errors:
        print(f"  [FAIL] import {err}")

    def echo(line: str) -> None:
        print(line, flush=True)

    print("== checks", flush=True)
    checks += run_checks(ctx, args.only, echo)
    rows: list[TimingRow] = []
    if not args.checks_only:
        print("== timings", flush=True)
        rows = run_timings(ctx, args.only, echo)
    print("\n== summary", flush=True)
    print(summary_table(checks, rows), flush=True)
    print(f"({time.monotonic() - ctx.started:.0f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "seed": seed, "quick": ctx.quick,
                       "checks": [asdict(c) for c in checks], "timings": [r.as_dict() for r in rows]},
                      f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if any(not c.passed and not c.skipped for c in checks) else 0


if __name__ == "__main__":
    # Run the registry of the module that gpu_*.py modules import (`longserve.bench.gpu_suite`), not this
    # __main__ copy of it.
    sys.exit(importlib.import_module("longserve.bench.gpu_suite").main())
