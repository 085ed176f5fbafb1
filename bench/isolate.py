"""Measure one case in a fresh Python process, so its peak memory owes nothing to other cases.

The parent (bench/run.py) calls :func:`run_isolated`; the child is this module:

    python -m bench.isolate MODULE KEY --device cpu [--smoke]

which rebuilds MODULE's case list, measures the case whose ``Case.key`` is KEY and prints the
:class:`~bench.case.Result` as one JSON line after ``BENCH_RESULT``. A child killed by the OS (out of memory) or past
its time limit becomes a row whose status says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import torch

from .case import Case, Result, run_case
from .timing import SMOKE_BUDGET, Budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "  # the child's result line (a benchmarked library may print its own JSON)


def run_isolated(module: str, case: Case, device: torch.device, smoke: bool,
                 timeout_s: float = 3600.0) -> Result:
    cmd = [sys.executable, "-m", "bench.isolate", module, case.key, "--device", str(device)]
    if smoke:
        cmd.append("--smoke")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result.of(case, device, status=f"failed: over the {timeout_s:.0f} s limit")
    lines = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (
            f"exit {proc.returncode}: {' '.join(proc.stderr.split()[-30:])}")
        return Result.of(case, device, status=f"failed: {why}")
    if proc.stderr.strip() and case.impl == "medix_fast":
        sys.stderr.write(proc.stderr)
    return Result(**json.loads(lines[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module")
    parser.add_argument("key")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = importlib.import_module(args.module).cases(args.smoke, device)
    case = next((c for c in cases if c.key == args.key), None)
    if case is None:
        raise SystemExit(f"no case {args.key!r} in {args.module}")
    result = run_case(case, device, SMOKE_BUDGET if args.smoke else Budget())
    print(MARK + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
