"""The commands answer at once: ``--help``, a bad command line and a config error are answered
before torch, transformers or triton is imported (issue 37: 4-5 s on a quiet 2-core machine,
20-50 s on a busy one, when they were imported first).

Each case runs the command in a fresh interpreter (``runpy``, as ``python -m`` does) and reports
its exit status and which heavy packages it imported: the deterministic check. The wall time is
bounded generously (a loaded machine is slow, but not torch-import slow).

Run: pytest tests/test_cli_startup.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "triton")
PROBE = """
import json, runpy, sys
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = [module, *argv]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.__stderr__)
""" % (HEAVY,)
TINY = str(ROOT / "configs" / "tiny.yaml")
CASES = [
    ("medix_fast.train", ["--help"], 0),
    ("medix_fast.train", ["train.stpes=3"], 2),  # a misspelt key
    ("medix_fast.train", ["optim.lr=-1"], 2),  # a bad value
    ("medix_fast.train", ["sampling.top_p=2"], 2),  # the sampler's rule
    ("medix_fast.train", ["algorithm.loss_type=ppo"], 2),  # not one of the choices
    ("medix_fast.train", ["--config", "missing.yaml"], 2),
    ("medix_fast.train", ["--resume", "--no-such-flag"], 2),
    ("medix_fast.eval", ["--help"], 0),
    ("medix_fast.eval", ["--limit", "3"], 2),  # no --model
    ("medix_fast.export", ["--help"], 0),
    ("medix_fast.export", ["--checkpoint", "x"], 2),  # no --out
    ("medix_fast.generate", ["--help"], 0),
    ("medix_fast.generate", ["--plan", "--config", TINY], 2),  # no --device-memory-gb
    ("medix_fast.generate", ["--plan", "--config", TINY, "--device-memory-gb", "80", "train.stpes=1"], 2),
]
# ``python -m medix_fast.kernels`` is not here: the package it runs from is the kernels (torch + triton)


@pytest.mark.parametrize("module, argv, code", CASES, ids=[f"{m} {' '.join(a)}" for m, a, _ in CASES])
def test_the_command_answers_before_importing_torch(module, argv, code):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, module, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    seconds = time.perf_counter() - start
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["code"] == code, done.stderr
    assert result["heavy"] == [], f"{module} {' '.join(argv)} imported {result['heavy']} before answering"
    assert seconds < 15, f"{module} {' '.join(argv)} took {seconds:.1f} s"
    if code == 2:
        assert "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
