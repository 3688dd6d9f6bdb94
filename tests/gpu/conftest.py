"""tests/gpu: tests that need a CUDA GPU. Without one, every test here is reported as skipped.

Rules for test modules in this folder (they are still imported where there is no GPU):
- allocate on the GPU inside tests or fixtures, never at import time;
- without CUDA this conftest sets TRITON_INTERPRET=1 before any test module imports triton, so that a kernel
  module imported here is not left compiled for a GPU for the CPU tests collected after it.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.gpu)


def pytest_runtest_setup(item):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
