"""Measure cases in fresh Python processes: one for a comparison's timing, one per case's memory.

The parent (bench/run.py) calls :func:`run_isolated` with the cases of one comparison group:
  - one process builds them all and times them round-robin (bench/case.py ``run_group``), so
    they share the machine's load;
  - one process per case warms it up and measures its peak memory alone, so the peak owes
    nothing to the other implementations.
The child is this module:

    python -m bench.isolate MODULE KEY [KEY ...] --device cpu --part time|memory|both [--smoke]

which rebuilds MODULE's case list, measures the cases whose ``Case.key`` are given and prints
each :class:`~bench.case.Result` as one JSON line after ``BENCH_RESULT``. A child killed by the
OS (out of memory) or past its time limit becomes rows whose status says so.
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

from .case import Case, Result, run_group
from .timing import SMOKE_BUDGET, Budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "  # the child's result line (a benchmarked library may print its own JSON)


def _child(module: str, cases: list[Case], device: torch.device, smoke: bool, part: str,
           timeout_s: float) -> list[Result]:
    cmd = [sys.executable, "-m", "bench.isolate", module, *(c.key for c in cases), "--device", str(device),
           "--part", part] + (["--smoke"] if smoke else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [Result.of(c, device, status=f"failed: over the {timeout_s:.0f} s limit") for c in cases]
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            row = Result(**json.loads(line[len(MARK):]))
            found[(row.bench, row.case, row.impl, row.shape)] = row
    if proc.stderr.strip() and any(c.impl == "medix_fast" for c in cases) and proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (
        f"exit {proc.returncode}: {' '.join(proc.stderr.split()[-30:])}")
    return [found.get((c.bench, c.case, c.impl, c.shape)) or Result.of(c, device, status=f"failed: {why}")
            for c in cases]


def run_isolated(module: str, cases: list[Case], device: torch.device, smoke: bool,
                 timeout_s: float = 3600.0) -> list[Result]:
    """Rows for ``cases`` (one comparison group of ``module``): timing and memory as described above."""
    stepwise = [c for c in cases if c.measure is None]
    timed = dict(zip((c.key for c in stepwise), _child(module, stepwise, device, smoke, "time", timeout_s)))
    out = []
    for case in cases:
        if case.measure is not None:  # its own loop: time and memory in one process of its own
            out += _child(module, [case], device, smoke, "both", timeout_s)
            continue
        row = timed[case.key]
        if row.status == "ok":
            mem = _child(module, [case], device, smoke, "memory", timeout_s)[0]
            row.peak_mb = mem.peak_mb
            row.status = mem.status
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module")
    parser.add_argument("keys", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=("time", "memory", "both"), default="both")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    by_key = {c.key: c for c in importlib.import_module(args.module).cases(args.smoke, device)}
    missing = [k for k in args.keys if k not in by_key]
    if missing:
        raise SystemExit(f"no case {missing} in {args.module}")
    parts = ("time", "memory") if args.part == "both" else (args.part,)
    results = run_group([by_key[k] for k in args.keys], device, SMOKE_BUDGET if args.smoke else Budget(), parts)
    for result in results:
        print(MARK + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
