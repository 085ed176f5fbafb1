"""``python -m bench --gpu-check`` in its dry mode (tiny shapes, the CPU): every part runs in its own
process and lands in the report with the header a reader of GPU figures needs; a part that fails,
overruns or finds the budget spent is a row, not the end of the check. The dry run runs as on the GPU
machine, without trl and datasets (one collection error would stop every test of the tests part).
About 60 s of 2 cores."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tests", "lm_head", "decode", "train", "paths", "sharded")
# the report's sections: the paths part has one per path (bench/gpu_paths.py)
SECTIONS = ("tests", "lm_head", "decode", "train", "ddp", "checkpoint", "eval", "vl", "preemption", "routing",
            "sharded")


def without_trl_or_datasets(tmp_path) -> dict:
    """An environment in which trl and datasets do not import, as on the GPU machine."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['trl'] = sys.modules['datasets'] = None\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEDIX_FAST_BACKEND")}
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])))


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # bench/ is not installed: it runs from the repository root
    from bench import gpu_check

    return gpu_check


def _report(out):
    with open(os.path.join(out, "check.csv")) as f:
        lines = f.read().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    return meta, list(csv.DictReader(line for line in lines if not line.startswith("#")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_dry_run_exercises_every_part(tmp_path):
    out = tmp_path / "out"
    # 3x the GPU budget: a loaded CI machine must not stop a part at its limit (tested on its own below)
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu-check", "--dry-run", "--out", str(out),
                           "--budget-s", "1350"], cwd=ROOT,
                          env=dict(without_trl_or_datasets(tmp_path), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta, rows = _report(out)
    assert {"command", "device", "torch", "CUDA", "triton", "driver", "date"} <= set(meta)
    assert meta["command"].startswith("python -m bench --gpu-check") and "dry run" in meta["mode"]
    assert (out / "check.md").read_text().count("## ") == len(SECTIONS)
    assert (out / "command.txt").exists() and all((out / f"{p}.log").exists() for p in PARTS)
    doctor = json.loads((out / "doctor.json").read_text())  # the environment, checked first
    assert meta["environment"] == ("supported" if doctor["ok"] else "; ".join(doctor["problems"]))
    by_part = {p: [r for r in rows if r["part"] == p] for p in SECTIONS}
    assert list(dict.fromkeys(r["part"] for r in rows)) == list(SECTIONS)
    tests = by_part["tests"]  # every file with a cuda mark collected without trl and datasets, skipped here
    assert len(tests) >= 10 and all(r["status"].startswith("skipped") for r in tests)
    assert {"test_cuda", "test_moe"} <= {r["shape"].rsplit(".", 1)[-1] for r in tests}
    ran = {(r["case"], r["impl"]) for r in by_part["lm_head"] if r["status"] == "ok"}
    assert {("policy_loss grpo fwd+bwd", "medix_fast"), ("logprobs fwd+bwd", "medix_fast"),
            ("policy_loss grpo fwd+bwd", "naive"), ("logprobs fwd+bwd", "naive")} <= ran
    decode = [r for r in by_part["decode"] if r["status"] == "ok"]
    assert {r["impl"] for r in decode} == {"medix_fast", "hf generate"} and len(decode) == 4
    assert all(float(r["tok_s"]) > 0 and float(r["gbps"]) > 0 for r in decode)
    train = by_part["train"]
    assert [r["case"] for r in train] == ["step 1", "step 2", "step 3", "3 steps"], train
    assert all(r["status"] == "ok" for r in train) and "rollout" in train[0]["note"]
    assert "mismatch |dlogp| mean" in train[0]["note"] and "nan" not in train[0]["note"]  # fp32 in the dry run
    sharded = by_part["sharded"]  # 2 gloo ranks in the dry run, the rollout tensor-parallel
    assert [r["case"] for r in sharded] == ["step 1", "step 2", "step 3", "3 steps"], sharded
    assert all(r["status"] == "ok" for r in sharded) and "rollout tensor-parallel" in sharded[0]["shape"]
    _check_paths(by_part)


def _check_paths(by_part):
    """The paths part's sections (bench/gpu_paths.py): each ran its path and its check, or says why not."""
    status = {p: {r["case"]: r["status"] for r in by_part[p]} for p in ("ddp", "checkpoint", "eval", "vl",
                                                                        "preemption", "routing")}
    assert status["ddp"] == {"1 rank step 1": "ok", "1 rank step 2": "ok", "1 rank 2 steps": "ok",
                             "2 ranks": status["ddp"]["2 ranks"]} and "need 2 GPUs" in status["ddp"]["2 ranks"]
    resumed = next(r for r in by_part["checkpoint"] if r["case"] == "resumed step 2 = straight step 2")
    assert resumed["status"] == "ok" and "metrics equal; weights max |dw| 0 (bitwise)" in resumed["note"]
    (ev,) = by_part["eval"]
    assert ev["status"] == "ok" and "equal to training's held-out evaluation" in ev["note"], ev
    assert status["vl"] == {"step 1": "ok", "step 2": "ok", "2 steps": "ok"}
    (pre,) = by_part["preemption"]
    assert pre["status"] == "ok" and " 0 preemptions" not in pre["note"] and "24/24 rows' tokens equal" in pre["note"]
    routing = status["routing"]
    assert routing["router_replay step 1"] == routing["router_replay 1 step"] == "ok"
    assert routing["record: graphs = eager"] == "ok"  # the static step records the expert ids too


def test_spent_budget_skips_parts(gpu_check, tmp_path, monkeypatch):
    import medix_fast.doctor

    ok = medix_fast.doctor.Report("3", "", [], None, [], {"built": False, "error": None}, {}, {}, [])  # the dry run checks it
    monkeypatch.setattr(medix_fast.doctor, "check", lambda **kw: ok)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1"]) == 0
    _, rows = _report(tmp_path)
    assert [(r["part"], r["status"]) for r in rows] == [(p, "skipped: total budget spent") for p in PARTS]


def test_a_failing_part_is_a_row(gpu_check, tmp_path):
    rows = gpu_check.run_parts(["no_such_part"], gpu_check.PARTS, True, str(tmp_path), 120)
    assert len(rows) == 1 and rows[0].status.startswith("failed: exit 2"), rows
    assert "invalid choice" in (tmp_path / "no_such_part.log").read_text()


FAKE_PARTS = """
import os, subprocess, sys, time
from bench.gpu_process import child
from bench.gpu_report import Row

def boom(dry, deadline, emit):
    emit(Row("boom", "pid", note=str(os.getpid())))
    raise RuntimeError("boom")

def quick(dry, deadline, emit):
    emit(Row("quick", "pid", note=str(os.getpid())))

def hang(dry, deadline, emit):
    subprocess.Popen(["sleep", "61.25"])  # a child of its own
    time.sleep(60)

sys.exit(child({"boom": boom, "quick": quick, "hang": hang}, {"boom": 1.0, "quick": 1.0, "hang": 1.0}, sys.argv[1:]))
"""


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A child module with a part that raises, one that returns and one that hangs (bench/gpu_process.py)."""
    (tmp_path / "fake_parts.py").write_text(FAKE_PARTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    return "fake_parts"


def test_a_part_that_raises_is_a_row_and_the_next_runs_in_a_fresh_process(gpu_check, tmp_path, fake_parts):
    out = tmp_path / "out"
    out.mkdir()
    rows = gpu_check.run_parts(["boom", "quick"], {"boom": 1.0, "quick": 1.0}, True, str(out), 60, module=fake_parts)
    assert [(r.part, r.case) for r in rows] == [("boom", "pid"), ("boom", "part"), ("quick", "pid")], rows
    assert rows[1].status.startswith("failed: RuntimeError: boom") and rows[0].note != rows[2].note  # two processes
    assert "Traceback" in (out / "boom.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_a_part_past_its_limit_is_stopped_with_its_children(gpu_check, tmp_path, fake_parts):
    rows = gpu_check.run_parts(["hang"], {"hang": 1.0}, True, str(tmp_path), 6, module=fake_parts)
    assert [r.status for r in rows] == ["failed: over its 6 s limit (see hang.log)"], rows
    leftover = subprocess.run(["pgrep", "-f", "sleep 61.25"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout  # nothing of the part survives it


SLOW_CUDA_TESTS = """
import time
import pytest

@pytest.mark.cuda
def test_quick():
    pass

@pytest.mark.cuda
def test_slow():
    time.sleep(60)
"""


def test_tests_part_stopped_at_its_limit_keeps_the_tests_run(gpu_check, tmp_path, monkeypatch):
    """pytest gets a Ctrl-C before the part's limit: its report still holds the tests that ran."""
    (tmp_path / "test_slow_cuda.py").write_text(SLOW_CUDA_TESTS)
    monkeypatch.setattr(gpu_check, "cuda_test_files", lambda: [str(tmp_path / "test_slow_cuda.py")])
    monkeypatch.setattr(gpu_check, "STOP_S", 3.0)
    rows = []
    gpu_check.part_tests(True, gpu_check.time.time() + 3 + 6, rows.append)  # 6 s to start pytest, run test_quick
    assert [(r.case, r.status[:6]) for r in rows] == [("test_quick", "ok"), ("pytest -m cuda", "failed")], rows
    assert "stopped at the part's time limit: the tests after these did not run" in rows[-1].status


def test_trl_tests_collect_without_trl_or_datasets(tmp_path):
    """The TRL adapter's tests skip, not fail to collect, without trl and datasets (the GPU machine's
    environment, which the dry run above runs in); the files with a cuda mark are the tests part's."""
    from bench.gpu_check import cuda_test_files

    assert {os.path.join("tests", "test_cuda.py"), os.path.join("tests", "test_moe.py")} <= set(cuda_test_files())
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", os.path.join("tests", "test_integrations_trl.py")],
                          cwd=ROOT, env=without_trl_or_datasets(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 5) and "error" not in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("name, tflops, tbps", [("NVIDIA H100 80GB HBM3", 989.0, 3.35), ("NVIDIA H100 PCIe", 756.0, 2.0),
                                                ("NVIDIA H200", 989.0, 4.8), ("NVIDIA L4", None, None)])
def test_percent_of_peak_is_of_the_card_it_runs_on(gpu_check, monkeypatch, name, tflops, tbps):
    """The LM head's % and the decode's % HBM come from bench/device.py's row for the card's name."""
    import bench.device

    monkeypatch.setattr(bench.device, "device_name", lambda device: name)
    cuda = torch.device("cuda")  # a device object needs no GPU
    got = gpu_check.bf16_tflops(cuda), gpu_check.hbm_tbps(cuda)
    assert got == (tflops, tbps) if tflops else all(x != x for x in got)  # NaN: no percentage
    assert all(x != x for x in (gpu_check.bf16_tflops(torch.device("cpu")), gpu_check.hbm_tbps(torch.device("cpu"))))
