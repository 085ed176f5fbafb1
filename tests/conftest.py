"""Test set-up: the Triton kernels run under the interpreter on CPU-only machines, and the
``backend`` fixture runs a kernel test once per implementation (``MEDIX_TEST_BACKENDS`` narrows it;
``cpp`` joins by default when the C++ ops build here). Tests marked ``cuda`` need a CUDA GPU and
are skipped without one; ``pytest -m cuda`` selects them (``python -m bench --gpu-check`` runs them).
Every run draws the same numbers: torch's global generator is seeded before each test (so a bare
``torch.randn`` is reproducible too) and hypothesis is derandomised, with no example database."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from medix_fast.kernels import cpp, force_backend  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

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


@pytest.fixture(autouse=True)
def _seed_torch():
    """The same global-generator stream for every test, whatever ran before it."""
    torch.manual_seed(0)
