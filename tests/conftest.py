"""Suite-wide settings: Triton kernels run in the interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a Triton kernel, so it lives here, loaded before every test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")
