"""Compile Triton kernels for a GPU on a machine without one, and report what the compiler made of them.

    python -m longserve.bench.kernel_report [--arch 90] [--dtype bfloat16] [--sass-dir DIR]

For every launch that a representative call of each kernel wrapper makes, this records the arguments,
specialises them the way Triton's launcher does (integers equal to 1 become constants, pointers and
integers divisible by 16 get the divisibility hint), compiles for the target with Triton's bundled ptxas,
and prints registers, spilled bytes (stack frame, LDL/STL), shared memory, and counts of the instructions
that matter (HGMMA = Hopper warpgroup MMA, HMMA = older MMA, LDGSTS = async global->shared copies,
LDG.E.128 = 16-byte loads). No CUDA driver is needed: it runs on the CPU machines and in CI.

Other kernel modules add their wrappers' representative calls with `register(name, fn, kernel_modules)`
(see register), where fn runs the wrappers once on small CPU tensors of realistic strides.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_REPRESENTATIVE_CALLS: dict[str, tuple[Callable[[torch.dtype], None], list[str]]] = {}

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                    torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8",
                    torch.uint8: "u8", torch.bool: "i1"}
_SASS_OPS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDG.E", "LDL", "STL")


def register(name: str, fn: Callable[[torch.dtype], None], kernel_modules: list[str]) -> None:
    """Add a representative call: fn(dtype) runs kernel wrappers on CPU tensors; the launches of the
    JITFunctions defined in kernel_modules (module names, each importing check_same_device from
    kernels/triton/common.py) are recorded instead of run, then compiled."""
    _REPRESENTATIVE_CALLS[name] = (fn, kernel_modules)


@dataclass
class Launch:
    kernel: Any  # a triton JITFunction
    args: tuple
    kwargs: dict


@dataclass
class KernelReport:
    name: str
    constants: dict
    num_warps: int
    num_stages: int
    registers: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    sass_ops: dict = field(default_factory=dict)
    error: str = ""

    def line(self) -> str:
        if self.error:
            return f"{self.name:<22} FAILED: {self.error}"
        shown = {k: v for k, v in self.constants.items() if not k.startswith("stride")}
        ops = " ".join(f"{k}={v}" for k, v in self.sass_ops.items() if v)
        return (f"{self.name:<22} regs={self.registers:<4} stack={self.stack_bytes:<4} smem={self.shared_bytes:<6} "
                f"warps={self.num_warps} stages={self.num_stages} {ops}\n{'':<22} {shown}")


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, args, kwargs))
        return launch


def record_launches(module, call: Callable[[], None]) -> list[Launch]:
    """Run call() with every JITFunction attribute of module replaced by a recorder."""
    import triton

    launches: list[Launch] = []
    saved = {}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, triton.runtime.jit.JITFunction):
            saved[name] = obj
            setattr(module, name, _Recorder(obj, launches))
    try:
        call()
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
    return launches


def _specialise(launch: Launch):
    """Signature, constants and divisibility hints the way Triton's launcher derives them."""
    kernel = launch.kernel
    names = kernel.arg_names
    values = dict(zip(names, launch.args))
    options = {}
    for key, value in launch.kwargs.items():
        if key in names:
            values[key] = value
        else:
            options[key] = value
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constants[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name] = "constexpr"
            constants[name] = None
        else:
            raise TypeError(f"cannot specialise argument {name}={value!r}")
    return signature, constants, attrs, options


def compile_launch(launch: Launch, arch: int = 90, sass_dir: str | None = None) -> KernelReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs, options = _specialise(launch)
    report = KernelReport(launch.kernel.__name__, constants, options.get("num_warps", 4),
                          options.get("num_stages", 3))
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = triton.compiler.make_backend(target)
        parsed = backend.parse_options(options)
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(src, target=target, options=parsed.__dict__)
    except Exception as e:  # a compile error is the finding
        report.error = " ".join(str(e).split())[:400]
        return report
    report.shared_bytes = compiled.metadata.shared
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True).stdout
    if m := re.search(r"REG:(\d+)", usage):
        report.registers = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", usage):
        report.stack_bytes = int(m.group(1))
    counts = collections.Counter()
    for line in sass.splitlines():
        for op in _SASS_OPS:  # most specific first; count each instruction once
            if re.search(r"\b" + re.escape(op) + r"(\s|\.|$)", line):
                counts[op] += 1
                break
    report.sass_ops = {op: counts[op] for op in _SASS_OPS}
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        tag = "_".join(f"{k}{v}" for k, v in constants.items() if not k.startswith("stride"))[:120]
        with open(os.path.join(sass_dir, f"{report.name}_{tag}.sass"), "w") as f:
            f.write(sass)
    return report


def _dense_calls(dtype: torch.dtype) -> None:
    """The dense wrappers at the shapes that matter: Hq 32 / Hkv 8 / D 128 with 64-token blocks (one table
    read per tile) and 16-token blocks (a table read per key), decode and prefill; D 64 with 8 query heads
    per KV head; D 256; and the cache write."""
    from ..kernels.base import AttentionMetadata
    from ..kernels.triton import dense as tri

    for kv_heads, group, head_dim, page in ((8, 4, 128, 64), (8, 4, 128, 16), (4, 8, 64, 64), (4, 2, 256, 32)):
        k_cache = torch.empty(64, kv_heads, page, head_dim, dtype=dtype)
        for query_len in (1, 512):
            seqs = 2
            tokens = seqs * query_len
            q = torch.empty(tokens, kv_heads * group, head_dim, dtype=dtype)
            meta = AttentionMetadata(
                positions=torch.zeros(tokens, dtype=torch.int64),
                slot_mapping=torch.zeros(tokens, dtype=torch.int64),
                block_tables=torch.zeros(seqs, 32, dtype=torch.int32),
                context_lens=torch.zeros(seqs, dtype=torch.int32),
                query_start_loc=torch.zeros(seqs + 1, dtype=torch.int32), block_size=page,
                context_lens_cpu=[2048] * seqs, query_lens_cpu=[query_len] * seqs)
            tri.paged_attention(q, k_cache, k_cache.clone(), meta, num_splits=200 if query_len == 1 else None)
            if query_len > 1 and page == 64:
                k = torch.empty(tokens, kv_heads, head_dim, dtype=dtype)
                tri.write_kv(k_cache, k_cache.clone(), k, k.clone(), meta.slot_mapping)


register("dense", _dense_calls, ["longserve.kernels.triton.dense"])


def run(names: list[str] | None = None, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
        sass_dir: str | None = None) -> list[KernelReport]:
    import importlib

    reports = []
    for name, (fn, module_names) in _REPRESENTATIVE_CALLS.items():
        if names and name not in names:
            continue
        modules = [importlib.import_module(m) for m in module_names]
        # The wrappers refuse CPU tensors outside the interpreter: let them through, nothing runs.
        saved = [m.check_same_device for m in modules]
        for m in modules:
            m.check_same_device = lambda **tensors: next(iter(tensors.values())).device
        try:
            launches = _record_all(modules, lambda: fn(dtype))
        finally:
            for m, original in zip(modules, saved):
                m.check_same_device = original
        reports.extend(compile_launch(launch, arch, sass_dir) for launch in launches)
    return reports


def _record_all(modules: list, call: Callable[[], None]) -> list[Launch]:
    """record_launches over several modules at once (nested, so every module's kernels are replaced)."""
    if not modules:
        call()
        return []
    inner: list[Launch] = []
    outer = record_launches(modules[0], lambda: inner.extend(_record_all(modules[1:], call)))
    return outer + inner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", nargs="*", help="names of registered calls (default: all)")
    parser.add_argument("--sass-dir", help="write each kernel's SASS here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles real GPU code", file=sys.stderr)
        return 2
    reports = run(args.only, getattr(torch, args.dtype), args.arch, args.sass_dir)
    for r in reports:
        print(r.line())
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
