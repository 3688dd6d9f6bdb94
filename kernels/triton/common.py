"""Small helpers shared by the Triton kernels: interpreter detection, device facts, launch sizes.

Imports only torch (triton is imported by the kernel modules themselves).
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1).

    Read at call time, but note that Triton decides at decoration time: set the variable before the kernel
    modules are imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached, so no driver call per step); a small stand-in
    elsewhere so the interpreter runs few programs."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        names = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"tensors must share one device: {names}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
                         "importing triton to run them on the CPU")
    return device
