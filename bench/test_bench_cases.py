"""pytest-benchmark front end to the same cases the harness runs (``python -m bench``).

    pytest bench/ --benchmark-only                        # smallest sizes (as --smoke)
    MEDIX_BENCH_FULL=1 pytest bench/ --benchmark-only     # the harness's full sizes

One test per case of every module with ``cases()`` (bench/run.py's MODULES); benchmarks are
grouped by (benchmark, case, shape) so pytest-benchmark's table compares implementations.
A baseline that cannot run here is skipped with its reason; a medix_fast failure fails.
pytest-benchmark measures time only; the harness also reports peak memory and ratios.
"""
import importlib
import importlib.util
import os

import pytest
import torch

from bench.case import SUBJECT, Skip
from bench.device import default_device
from bench.run import MODULE_BENCHES, MODULES

DEVICE = default_device()
SMOKE = os.environ.get("MEDIX_BENCH_FULL") != "1"
ROUNDS = 3 if SMOKE else 5  # fixed, so a full-size run takes a predictable time


def _cases() -> dict[str, list]:
    """Module name -> its cases (none for a module that runs its own loop)."""
    found = {}
    for name, module_name in MODULES.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        found[name] = module.cases(SMOKE, DEVICE) if hasattr(module, "cases") else []
    return found


BY_MODULE = _cases()
CASES = [case for cases in BY_MODULE.values() for case in cases]


def test_help_names_every_benchmark():
    """``python -m bench --help`` lists bench/run.py's MODULE_BENCHES for ``--only``, which imports only the
    modules it names: exactly each module's cases' names."""
    assert {name: {c.bench for c in cases} for name, cases in BY_MODULE.items()} == {
        name: set(MODULE_BENCHES[name]) for name in BY_MODULE}


@pytest.mark.parametrize("case", CASES, ids=[c.key.replace(" ", "_") for c in CASES])
def test_case(benchmark, case):
    if case.build is None:
        pytest.skip("timed by the harness only (python -m bench): it runs inside another trainer's loop")
    try:
        fn = case.build(DEVICE)
        fn()  # warm-up (compilation) outside the measurement; also where a baseline fails
    except Skip as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if case.impl == SUBJECT:
            raise
        pytest.skip(f"{case.impl} cannot run here: {type(exc).__name__}: {exc}")
    if DEVICE.type == "cuda":
        call = fn

        def fn():
            out = call()
            torch.cuda.synchronize()
            return out
    benchmark.group = f"{case.bench} {case.case} {case.shape}"
    benchmark.extra_info.update(impl=case.impl, shape=case.shape, tokens=case.tokens)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
