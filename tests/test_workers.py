"""The suite's default of 2 xdist workers (tests/conftest.py) applies to the command line only:
xdist runs the same hook in each worker, whose command line has no ``-n`` either, and a worker
that started workers of its own would fork without end."""
from types import SimpleNamespace

import conftest


def _config(**extra):
    return SimpleNamespace(option=SimpleNamespace(numprocesses=None, dist="no"), getoption=lambda name: False,
                           **extra)


def test_the_command_line_gets_the_default_workers(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    config = _config()
    conftest.pytest_cmdline_main(config)
    assert (config.option.numprocesses, config.option.dist) == (conftest.WORKERS, "loadfile")


def test_a_worker_starts_no_workers(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    config = _config(workerinput={"workerid": "gw0"})
    conftest.pytest_cmdline_main(config)
    assert config.option.numprocesses is None
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    config = _config()
    conftest.pytest_cmdline_main(config)
    assert config.option.numprocesses is None
