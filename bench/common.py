"""What the bench subcommands share, free of torch: the one-line error and token-count formatting.

cli.py imports throughput.py and serve.py when a benchmark runs; they import this module, never cli.py, so
bench/ has no import cycle.
"""

from __future__ import annotations

from ..engine.errors import EngineError


class BenchError(EngineError):
    """A one-line user-facing failure (bad option, does not fit in memory, server unreachable)."""


def format_tokens(n: int) -> str:
    """1048576 -> '1M', 131072 -> '128K', 1.5 * 2^20 -> '1.5M', 1000 -> '1000'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % (size // 16) == 0:
            return f"{n / size:g}{unit}"
    return str(n)
