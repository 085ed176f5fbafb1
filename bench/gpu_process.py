"""The GPU check's processes: its parts run one after another in one child process, each within its
time limit, so that a crash, hang or out-of-memory costs only the part it happens in.

The parent (:func:`run_parts`) starts a child (``python -m bench.gpu_check --child ...``) for the
parts still to run and watches it: the child writes its rows after each one (``.rows.json``) and
which part it is in with that part's deadline (``.progress.json``). A part past its deadline is
stopped with its process group (the child and whatever it started: pytest, torchrun), a child that
dies ends its part with a row saying how; either way a fresh child takes the parts after it. A part
that raises is a row, and its child then exits, so that the next part starts in a fresh process (a
CUDA error leaves the context unusable). Starting torch, transformers and the trainer once for
every part, not once per part, is most of what a dry run on the CPU costs less.

A part's time limit is its share of the budget (``shares``, scaled to ``--budget-s``) plus what the
parts before it left unused; one left under :data:`MIN_S` is skipped ("total budget spent").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback

from bench.gpu_report import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_S = 5.0  # a part with less time left is skipped
SLACK_S = 5.0  # a part's functions are told to stop this long before its limit (they check between cases)


def part_limit(pending: list[str], shares: dict[str, float], budget_s: float, start: float) -> float:
    """Seconds ``pending[0]`` may take: the budget left, less the shares of the parts after it."""
    later = sum(shares.get(n, 0.0) for n in pending[1:]) * budget_s / sum(shares.values())
    return budget_s - (time.time() - start) - later


def _read(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return default


def _write(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)  # a crash later keeps what was written so far


# ----------------------------------------------------------------------------- the parent
def run_parts(names: list[str], shares: dict[str, float], dry: bool, out: str, budget_s: float,
              seconds: dict[str, float] | None = None, module: str = "bench.gpu_check") -> list[Row]:
    """Run parts ``names`` in order within ``budget_s``: their rows, plus one for each part that did
    not end well (``seconds``: filled with each part's wall time). Part ``X`` logs to ``out/X.log``.
    ``module``: what ``python -m`` runs as the child (it calls :func:`child`)."""
    start, rows, pending = time.time(), [], list(names)
    seconds = {} if seconds is None else seconds
    while pending:
        if part_limit(pending, shares, budget_s, start) < MIN_S:
            rows.append(Row(pending.pop(0), "part", impl="", status="skipped: total budget spent"))
            continue
        got, finished, ended = _child(module, pending, shares, dry, out, budget_s, start, seconds)
        rows += got
        pending = pending[len(finished) + (ended is not None):]
    return rows


def _child(module, pending, shares, dry, out, budget_s, start, seconds) -> tuple[list[Row], list[str], str | None]:
    """One child for ``pending``: (its rows, the parts it finished, the part it ended in, if it ended early)."""
    rows_path, progress_path = os.path.join(out, ".rows.json"), os.path.join(out, ".progress.json")
    for path in (rows_path, progress_path):
        if os.path.exists(path):
            os.remove(path)
    cmd = [sys.executable, "-m", module, "--child", "--out", out, "--budget-s", str(budget_s),
           "--start", str(start), "--parts", *pending] + (["--dry-run"] if dry else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    launched, ending, shown = time.time(), None, None
    with open(os.path.join(out, f"{pending[0]}.log"), "w") as log:  # until the child opens the part's own
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                progress = _read(progress_path, {})
                running = progress.get("running")
                deadline = progress["deadline"] if running else time.time() + part_limit(pending, shares, budget_s, start)
                if running and running != shown:
                    print(f"[gpu-check] {running}: up to {progress['limit']:.0f} s", flush=True)
                    shown = running
                if time.time() > deadline:
                    part = running or pending[0]
                    ending = f"failed: over its {deadline - (progress.get('started') or launched):.0f} s limit " \
                             f"(see {part}.log)"
                    code = None
                    break
        finally:  # the child and whatever it started (pytest, the trainer): nothing outlives a limit
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    progress = _read(progress_path, {})
    finished = progress.get("finished", [])
    seconds.update(progress.get("seconds", {}))
    rows = [Row(**r) for r in _read(rows_path, [])]
    if len(finished) == len(pending) or (code == 3 and finished):  # all done, or a part raised (its row says so)
        return rows, finished, None
    part = pending[len(finished)]  # the part it was in (or about to start) when it ended
    seconds[part] = time.time() - (progress.get("started") if progress.get("running") == part else launched)
    rows.append(Row(part, "part", impl="", status=ending or f"failed: exit {code} (see {part}.log)"))
    return rows, finished, part


# ----------------------------------------------------------------------------- the child
def child(funcs: dict, shares: dict[str, float], argv: list[str]) -> int:
    """Run ``--parts`` in order with ``funcs`` (name -> ``f(dry, deadline, emit)``); 3 after a part that
    raised (the parent starts the rest in a fresh process), else 0."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check --child")
    p.add_argument("--child", action="store_true")
    p.add_argument("--parts", nargs="+", choices=funcs, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--start", type=float, required=True, help="when the check started (epoch s)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    rows: list[dict] = []
    progress = {"running": None, "finished": [], "seconds": {}}
    rows_path, progress_path = os.path.join(args.out, ".rows.json"), os.path.join(args.out, ".progress.json")

    def emit(row: Row) -> None:
        rows.append(dataclasses.asdict(row))
        print(f"[gpu-check] {row.part} {row.case} {row.impl}: {row.status} {row.ms:,.1f} ms", flush=True)
        _write(rows_path, rows)

    for i, name in enumerate(args.parts):
        limit = part_limit(args.parts[i:], shares, args.budget_s, args.start)
        if limit < MIN_S and i > 0:  # the first: the parent started this process for it
            emit(Row(name, "part", impl="", status="skipped: total budget spent"))
            _finish(progress, progress_path, name, time.time())
        else:
            _log_to(os.path.join(args.out, f"{name}.log"))
            started, before = time.time(), len(rows)
            progress.update(running=name, started=started, limit=limit, deadline=started + limit)
            _write(progress_path, progress)
            try:
                funcs[name](args.dry_run, started + limit - SLACK_S, emit)
            except Exception as exc:  # a row; the next part in a fresh process
                traceback.print_exc()
                emit(Row(name, "part", impl="", status=f"failed: {type(exc).__name__}: {exc} (see {name}.log)"[:300]))
                return _finish(progress, progress_path, name, started, failed=True)
            if len(rows) == before:
                emit(Row(name, "part", impl="", status="failed: no result"))
            _finish(progress, progress_path, name, started)
        gc.collect()
        _empty_cuda_cache()
    return 0


def _finish(progress: dict, path: str, name: str, started: float, failed: bool = False) -> int:
    progress["finished"].append(name)
    progress["seconds"][name] = time.time() - started
    progress["running"] = None
    _write(path, progress)
    return 3 if failed else 0


def _log_to(path: str) -> None:
    """This process's stdout and stderr (its children's too) from now on into ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _empty_cuda_cache() -> None:
    """What a part left in the CUDA allocator's cache goes back before the next part sizes its memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
