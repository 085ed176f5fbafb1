"""Test set-up: the Triton kernels run under the interpreter on CPU-only machines, and the
``backend`` fixture runs a kernel test once per implementation (``MEDIX_TEST_BACKENDS`` narrows it;
``cpp`` joins by default when the C++ ops build here). Tests marked ``cuda`` need a CUDA GPU and
are skipped without one; ``pytest -m cuda`` selects them (``python -m bench --gpu-check`` runs them)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

import pytest  # noqa: E402

from medix_fast.kernels import cpp, force_backend  # noqa: E402

BACKENDS = os.environ.get("MEDIX_TEST_BACKENDS", "torch,triton" + (",cpp" if cpp.available() else "")).split(",")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one kernel implementation for the duration of a test."""
    with force_backend(request.param):
        yield request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; python -m bench --gpu-check runs them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
