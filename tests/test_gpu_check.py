"""``python -m bench --gpu-check`` in its dry mode (tiny shapes, the CPU): every part runs in its own
process and lands in the report with the header a reader of GPU figures needs; a part that fails,
overruns or finds the budget spent is a row, not the end of the check. About 30 s of 2 cores."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tests", "lm_head", "decode", "train", "sharded")


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
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEDIX_FAST_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu-check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta, rows = _report(tmp_path)
    assert {"command", "device", "torch", "CUDA", "triton", "driver", "date"} <= set(meta)
    assert meta["command"].startswith("python -m bench --gpu-check") and "dry run" in meta["mode"]
    assert (tmp_path / "check.md").read_text().count("## ") == len(PARTS)
    assert (tmp_path / "command.txt").exists() and all((tmp_path / f"{p}.log").exists() for p in PARTS)
    doctor = json.loads((tmp_path / "doctor.json").read_text())  # the environment, checked first
    assert meta["environment"] == ("supported" if doctor["ok"] else "; ".join(doctor["problems"]))
    by_part = {p: [r for r in rows if r["part"] == p] for p in PARTS}
    tests = by_part["tests"]
    assert len(tests) >= 10 and all(r["status"].startswith("skipped") for r in tests)  # no GPU here
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


def test_spent_budget_skips_parts(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1"]) == 0
    _, rows = _report(tmp_path)
    assert [(r["part"], r["status"]) for r in rows] == [(p, "skipped: total budget spent") for p in PARTS]


def test_a_failing_part_is_a_row(gpu_check, tmp_path):
    rows = gpu_check.run_part("no_such_part", True, 120, str(tmp_path))
    assert len(rows) == 1 and rows[0].status.startswith("failed: exit 2"), rows
    assert "invalid choice" in (tmp_path / "no_such_part.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_a_part_past_its_limit_is_stopped_with_its_children(gpu_check, tmp_path):
    rows = gpu_check.run_part("train", True, 3, str(tmp_path))
    assert rows[-1].status.startswith("failed: over its 3 s limit"), rows
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True)  # its command names tmp_path
    assert leftover.returncode == 1, leftover.stdout  # nothing of the part survives it


def test_tests_part_collects_its_files_without_trl_or_datasets(tmp_path):
    """The tests part runs the files with a cuda mark, on the GPU and in the dry run alike, and they
    (and the TRL adapter's tests, skipped) collect with trl and datasets unimportable: the GPU
    machine has neither, and one collection error would stop every test of the part."""
    from bench.gpu_check import cuda_test_files

    files = cuda_test_files()
    assert {os.path.join("tests", "test_cuda.py"), os.path.join("tests", "test_moe.py")} <= set(files)
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['trl'] = sys.modules['datasets'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                           *files, os.path.join("tests", "test_integrations_trl.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_cuda.py::" in proc.stdout


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
