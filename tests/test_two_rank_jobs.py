"""The suite's shared two-rank launch (tests/two_rank_jobs.py), without launching: a failed job
fails only its own tests and the jobs after it run in a launch of their own; the session's processes
share one launch; a job's output goes to its folder. (The jobs themselves run in the test files
that read them.)"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import two_rank_jobs as T


@pytest.fixture
def fake_launches(monkeypatch):
    """``run_launch`` replaced by one that runs the jobs it is given in order, each rank writing its
    done file, until a job named in ``failing`` (its rank 1 ends with a traceback); the job lists
    of the launches are recorded."""
    launches, failing = [], set()

    def run_launch(args, cwd, timeout, launcher=()):
        out, jobs = args[1], args[2].split(",")
        launches.append(jobs)
        for job in jobs:
            folder = Path(out) / job
            folder.mkdir(exist_ok=True)
            (folder / "rank0.done").write_text("{}")
            if job in failing:
                (folder / "rank1.err").write_text(f"Traceback ...\nAssertionError: {job} is broken\n")
                return subprocess.CompletedProcess(args, 1, "", "ChildFailedError")
            (folder / "rank1.done").write_text("{}")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(T, "run_launch", run_launch)
    return launches, failing


def test_a_failed_job_fails_alone_and_the_jobs_after_it_run_again(tmp_path, fake_launches):
    launches, failing = fake_launches
    failing.add("ckpt_train")
    jobs = T.jobs_of({"test_distributed.py", "test_checkpoint.py", "test_moe.py"})
    assert jobs == ["dist", "fsdp_run", "ckpt_train", "ckpt_resume", "moe"]
    results = T.shared(tmp_path, jobs)
    assert launches == [jobs, ["ckpt_resume", "moe"]]
    assert list(results.failed) == ["ckpt_train"]
    assert results.folder("moe") == tmp_path / "two_rank_jobs" / "moe"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)'ckpt_train'.*rank 1 stderr.*ckpt_train is broken"):
        results.folder("ckpt_train")


def test_the_session_launches_once(tmp_path, fake_launches):
    launches, _ = fake_launches
    first, again = T.shared(tmp_path, ["dist"]), T.shared(tmp_path, ["dist"])  # a second xdist worker
    assert launches == [["dist"]] and first.failed == again.failed == {}
    assert json.loads((tmp_path / "two_rank_jobs.json").read_text()) == {"jobs": ["dist"], "failed": {}}


def test_every_test_file_of_a_job_uses_the_fixture():
    for function, test_file in T.JOBS.values():
        module, name = function.split(":")
        assert "two_ranks" in (Path(__file__).parent / test_file).read_text(), test_file
        assert f"def {name}(" in (Path(__file__).parent / f"{module}.py").read_text(), function


def test_a_jobs_output_goes_to_its_folder_and_back(tmp_path):
    cwd = os.getcwd()
    with T.redirected(tmp_path, 1):
        os.write(1, b"to the job's stdout\n")
        subprocess.run("echo from a child >&2", shell=True, check=True)
        assert os.getcwd() == str(tmp_path)
    assert os.getcwd() == cwd
    assert (tmp_path / "rank1.out").read_text() == "to the job's stdout\n"
    assert (tmp_path / "rank1.err").read_text() == "from a child\n"
