"""Shared test configuration.

- Tests marked ``gpu`` are skipped cleanly when CUDA is absent.
- Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
  ``triton.jit`` decorates anything, so it is set here, before any featureviz module is imported.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # client-only environment
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
