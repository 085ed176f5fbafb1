"""The benchmark harness at its smallest sizes, so the benchmarks cannot rot (timings are not checked).

Runs ``python -m bench --smoke --threads 1`` in a subprocess (about 40 s of one core; one thread so
that a busy CI machine does not stall it) and checks that every medix_fast case ran and produced a
complete row, and that the CSV and Markdown carry the header a reader needs; a second run checks
one benchmark in the isolated (fresh process per case) mode. ``bench/``'s own pytest front end
(``bench/test_bench_cases.py``) runs here too on one benchmark's cases, so CI runs its plumbing.
"""
import csv
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env() -> dict:
    """As a user runs the benchmarks: no forced back-end, no Triton interpreter, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEDIX_FAST_BACKEND")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _bench(*args):
    """``python -m bench --smoke --threads 1 ARGS``: the report's header, rows, Markdown and folder."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--threads", "1", *args],
                          cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csv_path = re.search(r"\[bench\] wrote (\S+) and", proc.stdout).group(1)
    with open(csv_path) as f:
        lines = f.read().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    with open(csv_path.removesuffix(".csv") + ".md") as f:
        return meta, rows, f.read(), os.path.dirname(csv_path)


def _check_subject_rows(rows):
    subject = [r for r in rows if r["impl"] == "medix_fast"]
    assert subject
    for r in subject:
        assert r["status"] == "ok", r
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert math.isfinite(float(r["peak_mb"])) and float(r["peak_mb"]) >= 0, r
    return subject


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc")
def test_smoke_run_covers_every_benchmark(tmp_path):
    meta, rows, md, _ = _bench("--out", str(tmp_path))
    assert {"advantages", "logprobs", "policy_loss", "sampler", "rewards", "train"} <= {r["bench"] for r in rows}
    subject = _check_subject_rows(rows)
    losses = {r["case"] for r in subject if r["bench"] == "policy_loss"}
    assert {"grpo fwd+bwd", "dapo fwd+bwd", "gspo fwd+bwd"} <= losses
    assert any(r["impl"] == "naive" and r["status"] == "ok" for r in rows)
    # every naive row that ran gives its group's medix_fast row a ratio (memory: when it used any)
    def group(r):
        return r["suite"], r["bench"], r["case"], r["shape"]

    naive = {group(r): r for r in rows if r["impl"] == "naive" and r["status"] == "ok"}
    for r in subject:
        base = naive.get(group(r))
        if base is not None:
            assert math.isclose(float(r["time/naive"]), float(r["median_ms"]) / float(base["median_ms"])), r
            assert float(base["peak_mb"]) < 1 or math.isfinite(float(r["mem/naive"])), r
    # a baseline that cannot run here is a row with its reason, not a crash
    assert all(r["status"] == "ok" or r["status"].startswith(("skipped:", "failed:")) for r in rows)
    assert {"device", "date", "torch", "command"} <= set(meta) and "--smoke" in meta["command"]
    assert "### policy_loss" in md and "**command**" in md


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc")
def test_isolated_mode_measures_in_fresh_processes_and_leaves_the_results_folder_alone():
    """Without --out a smoke run writes to a temporary folder: bench/results/ holds results only."""
    results = os.path.join(ROOT, "bench", "results")
    before = sorted(os.walk(results))
    meta, rows, _, folder = _bench("--only", "advantages", "--isolate")
    assert not folder.startswith(results), folder
    shutil.rmtree(folder)
    assert sorted(os.walk(results)) == before
    assert {r["bench"] for r in rows} == {"advantages"}
    assert "fresh process per case" in meta["cases"]
    _check_subject_rows(rows)


def test_bench_pytest_front_end_runs_its_cases(tmp_path):
    """``pytest bench/`` with timing off, on one benchmark's cases (the smoke run above runs every
    case's callable; this is the front end's plumbing): a medix_fast case that fails fails the run, a
    baseline that cannot run here is a skip with its reason."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/", "-k", "advantages or help"], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def test_unknown_only_name_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)  # bench/ is not installed: it runs from the repo root
    from bench.run import main

    assert main(["--smoke", "--only", "no_such_bench", "--out", str(tmp_path)]) == 2
    assert "no_such_bench" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_help_lists_the_only_names_and_the_gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # bench/ is not installed: it runs from the repo root
    from bench.run import BENCHES, MODULES

    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps the help text
    modules, benches = re.search(r"modules: (.*?); benchmarks: (.*?) --out", text).groups()
    assert modules.split(", ") == list(MODULES)
    assert set(modules.split(", ")) | set(benches.split(", ")) == set(MODULES) | set(BENCHES)
    assert "--gpu-check the prepared check of every CUDA path" in text
    assert "python -m bench --gpu-check --help" in text


def test_peak_table_matches_real_device_names(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # bench/ is not installed: it runs from the repo root
    from bench.device import peak_for

    assert peak_for("NVIDIA H100 80GB HBM3").tbps == 3.35
    assert peak_for("NVIDIA H100 PCIe").tflops == 756.0
    assert peak_for("NVIDIA H200").tbps == 4.8
    assert peak_for("NVIDIA A100-SXM4-80GB").tflops == 312.0
    assert peak_for("NVIDIA GeForce RTX 4090") is None
