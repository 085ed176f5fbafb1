"""Test set-up: the Triton kernels run under the interpreter on CPU-only machines, and the
``backend`` fixture runs a kernel test once per implementation (``MEDIX_TEST_BACKENDS`` narrows it;
``cpp`` joins by default when the C++ ops build here). Tests marked ``cuda`` need a CUDA GPU and
are skipped without one; ``pytest -m cuda`` selects them (``python -m bench --gpu-check`` runs them).
Every run draws the same numbers: torch's global generator is seeded before each test (so a bare
``torch.randn`` is reproducible too) and hypothesis is derandomised, with no example database.
The suite runs on ``WORKERS`` pytest-xdist processes unless ``-n`` says otherwise (``-n 0``: one
process), each test file on one of them (module fixtures built once), torch's threads shared out
between them; only here, so that ``pytest bench/`` (timings, which xdist would switch off) is not.
The ``two_ranks`` fixture runs the session's two-rank jobs in one torchrun launch (tests/two_rank_jobs.py)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the cores shared out between the workers (pytest_cmdline_main below)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from medix_fast.kernels import cpp, force_backend  # noqa: E402
from two_rank_jobs import Results, jobs_of, shared  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

WORKERS = 2  # the CI machine's cores

BACKENDS = os.environ.get("MEDIX_TEST_BACKENDS", "torch,triton" + (",cpp" if cpp.available() else "")).split(",")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one kernel implementation for the duration of a test."""
    with force_backend(request.param):
        yield request.param


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Before xdist reads ``-n`` (this initial conftest's hook runs first): ``WORKERS`` when not given.
    Never in a worker: xdist runs this hook there too, with the command line that had no ``-n``, and
    each worker would start workers of its own."""
    if hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ:
        return
    if getattr(config.option, "numprocesses", 0) is None and not config.getoption("usepdb"):
        config.option.numprocesses = WORKERS
        if config.option.dist == "no":
            config.option.dist = "loadfile"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; python -m bench --gpu-check runs them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def two_ranks(request, tmp_path_factory) -> Results:
    """The two-rank jobs (tests/two_rank_jobs.py) of the test files collected that use this fixture, in one
    torchrun launch for the session: the first test asking runs it, under xdist in the session's shared
    temporary folder (its workers read its results there); ``.folder(job)`` is a job's folder."""
    files = {item.path.name for item in request.session.items if "two_ranks" in item.fixturenames}
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    return shared(root, jobs_of(files))


@pytest.fixture(autouse=True)
def _seed_torch():
    """The same global-generator stream for every test, whatever ran before it."""
    torch.manual_seed(0)
