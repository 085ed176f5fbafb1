"""The suite's two-rank jobs (2 gloo processes, CPU) in one ``torchrun`` launch per test session: each
rank's imports and the rendezvous are paid once, not once per job. tests/conftest.py's ``two_ranks``
fixture launches the jobs of the test files collected (once per session, its xdist workers included)
and gives each test file its jobs' folders.

    torchrun --nproc_per_node=2 tests/two_rank_jobs.py OUT JOB[,JOB...]   # what the fixture runs

A job is a function ``(folder, info)`` (``JOBS``: its ``module:function``, and the test file reading
its folder ``OUT/<job>``), run by both ranks in turn in the launch's one process group: its cwd is its
folder, each rank's stdout and stderr go to ``rank<R>.out`` / ``rank<R>.err`` there, and before it
the global generators are seeded (0) and the watchdog's position reset, so no job sees another's state.
A rank that ends a job writes ``rank<R>.done`` (the job's CPU seconds); a job that raises prints its
traceback there and ends its rank (status 1; torchrun ends the other, which may wait in a collective):
the jobs after it run in a launch of their own, and only the failed job's tests fail, with its
traceback. The jobs keep the default group: ``torch.distributed.destroy_process_group`` (a job's
``distributed.close``) leaves it, since a group made again under torchrun's one store would read the
first one's keys (``medix_fast.distributed.attempt_store``).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

JOBS = {  # job: (module:function, the test file reading its folder); run in this order
    "dist": ("dist_worker:run", "test_distributed.py"),
    "fsdp_run": ("test_distributed:fsdp_training_run", "test_distributed.py"),
    "ckpt_train": ("ckpt_worker:train", "test_checkpoint.py"),
    "ckpt_resume": ("ckpt_worker:resume", "test_checkpoint.py"),
    "tp_engine": ("tp_worker:engine", "test_tensor_parallel.py"),
    "tp_train": ("tp_worker:train", "test_tensor_parallel.py"),
    "offload": ("offload_worker:run", "test_offload_adamw.py"),
    "moe": ("moe_dist_worker:run", "test_moe.py"),
    "eval": ("test_eval:two_rank_eval", "test_eval.py"),
    "restart_whole": ("test_restart:uninterrupted", "test_restart.py"),
}
RANKS = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
JOB_TIMEOUT_S = 120  # a launch is stopped after this long per job it runs (a job takes seconds, the imports ~15)
GROUP_TIMEOUT_MIN = 5.0  # a collective one rank never joins fails the job after this long


def torchrun_env() -> dict:
    """The environment of a launch: one torch thread per rank (2 ranks share the test's cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}


def run_launch(args: list[str], cwd: Path, timeout: float, launcher: list[str] = ()) -> subprocess.CompletedProcess:
    """``torchrun`` (``launcher``'s flags too) running ``args``, its output captured; past ``timeout``
    its whole process group (the ranks too) is killed and the return code is None."""
    with subprocess.Popen([*TORCHRUN, *launcher, *args], cwd=cwd, env=torchrun_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return subprocess.CompletedProcess(proc.args, None, out, err + f"\n[killed after {timeout:.0f} s]")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finished(out: Path, job: str) -> bool:
    return all((out / job / f"rank{r}.done").exists() for r in range(RANKS))


def failure(out: Path, job: str, done: subprocess.CompletedProcess) -> str:
    """Why ``job`` did not finish: each rank's stderr (its traceback), then the launcher's."""
    parts = [f"two-rank job {job!r} ({JOBS[job][0]}) did not finish; the launch exited {done.returncode}"]
    for r in range(RANKS):
        err = out / job / f"rank{r}.err"
        parts.append(f"--- rank {r} stderr ({err}):\n" + (err.read_text()[-6000:] if err.exists() else "(none)"))
    parts.append("--- torchrun stderr:\n" + done.stderr[-3000:])
    return "\n".join(parts)


def launch(out: Path, jobs: list[str]) -> dict[str, str]:
    """Run ``jobs`` under ``out``: one launch, and after a failed job one more for the jobs after it.
    Returns {job: why} for the jobs that failed."""
    failed, left = {}, list(jobs)
    while left:
        done = run_launch([__file__, str(out), ",".join(left)], out, JOB_TIMEOUT_S * len(left))
        unfinished = [job for job in left if not finished(out, job)]
        if not unfinished:
            if done.returncode != 0:  # every job ended, then the launch failed: no job's own result holds
                failed.update({job: failure(out, job, done) for job in left})
            return failed
        failed[unfinished[0]] = failure(out, unfinished[0], done)
        left = left[left.index(unfinished[0]) + 1:]
    return failed


class Results:
    """The jobs' folders under ``out``; ``failed``: {job: why}."""

    def __init__(self, out: Path, jobs: list[str], failed: dict[str, str]):
        self.out, self.jobs, self.failed = out, jobs, failed

    def folder(self, job: str) -> Path:
        """``job``'s folder; its failure (the ranks' tracebacks) fails the test asking for it."""
        import pytest

        if job in self.failed:
            pytest.fail(self.failed[job], pytrace=False)
        assert job in self.jobs, f"{job!r} is not a job of this session: {JOBS[job][1]} must use two_ranks"
        return self.out / job


def jobs_of(test_files: set[str]) -> list[str]:
    """The jobs that the files named ``test_files`` read, in the order they run."""
    return [job for job, (_, test_file) in JOBS.items() if test_file in test_files]


def shared(root: Path, jobs: list[str]) -> Results:
    """The results of ``jobs`` under ``root``: the first process of the session to ask launches them,
    holding a lock there; the others (xdist's workers) wait on the lock, then read what it wrote."""
    from filelock import FileLock

    cache, out = root / "two_rank_jobs.json", root / "two_rank_jobs"
    with FileLock(f"{cache}.lock"):
        if not cache.exists():
            out.mkdir()
            cache.write_text(json.dumps({"jobs": jobs, "failed": launch(out, jobs)}))
        saved = json.loads(cache.read_text())
    return Results(out, saved["jobs"], saved["failed"])


@contextlib.contextmanager
def redirected(folder: Path, rank: int):
    """This process's stdout and stderr (the file descriptors: C++ and child output too) into
    ``folder/rank<R>.out`` / ``.err``, and its cwd in ``folder``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2), os.getcwd()]
    for fd, suffix in ((1, "out"), (2, "err")):
        target = os.open(folder / f"rank{rank}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(folder)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(saved[2])
        for fd, copy in ((1, saved[0]), (2, saved[1])):
            os.dup2(copy, fd)
            os.close(copy)


def main(out: Path, jobs: list[str]) -> None:
    import importlib
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    from medix_fast import distributed as D
    from medix_fast.watchdog import where

    sys.path.insert(0, str(Path(__file__).parent))  # the workers and the test files they import
    info = D.init_distributed("cpu", "gloo", timeout_min=GROUP_TIMEOUT_MIN)
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    for job in jobs:
        folder = out / job
        folder.mkdir(exist_ok=True)
        module, function = JOBS[job][0].split(":")
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        where.__init__()
        start = time.process_time()
        with redirected(folder, info.rank):
            try:
                getattr(importlib.import_module(module), function)(folder, info)
            except BaseException:  # noqa: BLE001 - the job's traceback, for its tests to show
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
        (folder / f"rank{info.rank}.done").write_text(json.dumps({"cpu_s": round(time.process_time() - start, 1)}))
    D.close()
    destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
