"""Checks of the attention methods' parameters (plan.params), shared by every method so that a bad value reads
the same everywhere: one BackendError line "<method>: <name> must be ..., got <value>"."""

from __future__ import annotations

import math
from typing import Any, Iterable

from .base import BackendError

IMPLS = ("auto", "torch", "triton")


def with_defaults(method: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """params over the defaults; a BackendError naming the unknown parameters."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise BackendError(f"{method}: unknown parameter {', '.join(repr(n) for n in unknown)} "
                           f"(known: {', '.join(defaults)})")
    return {**defaults, **params}


def int_param(method: str, params: dict[str, Any], name: str, minimum: int) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BackendError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def number_param(method: str, params: dict[str, Any], name: str, low: float | None = None,
                 high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> float:
    """A finite number within [low, high] (a bound None: unbounded; open_*: that end excluded), as a float."""
    value = params[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if open_low else value >= low))
    ok = ok and (high is None or (value < high if open_high else value <= high))
    if not ok:
        lo = "(-inf" if low is None else f"{'(' if open_low else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if open_high else ']'}"
        raise BackendError(f"{method}: {name} must be a number in {lo}, {hi}, got {value!r}")
    return float(value)


def choice_param(method: str, params: dict[str, Any], name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if params[name] not in choices:
        raise BackendError(f"{method}: {name} must be one of {', '.join(repr(c) for c in choices)}, "
                           f"got {params[name]!r}")
    return params[name]


def bool_param(method: str, params: dict[str, Any], name: str) -> bool:
    if not isinstance(params[name], bool):
        raise BackendError(f"{method}: {name} must be true or false, got {params[name]!r}")
    return params[name]


def check_impl_name(method: str, impl: Any) -> str:
    return choice_param(method, {"impl": impl}, "impl", IMPLS)
