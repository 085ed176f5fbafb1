"""``python -m medix_fast.doctor``: versions against the declared ranges (faked ones included),
exit codes, the back-end table and the JSON form.

    pytest tests/test_doctor.py
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from medix_fast import deps, doctor
from medix_fast.kernels import cpp, dispatch, force_backend


def fake_versions(monkeypatch, **versions):
    """Pretend distribution ``name`` (``_`` for ``-``) is installed at ``version`` (None: missing)."""
    real = doctor.installed_version
    fake = {k.replace("_", "-"): v for k, v in versions.items()}
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake[name] if name in fake else real(name))


def package(report, name):
    return next(p for p in report.packages if p.name == name)


def test_this_environment_is_supported_and_reported():
    report = doctor.check()  # the C++ ops: loaded already by conftest when they build here
    assert report.ok, report.problems
    torch_pkg = package(report, "torch")
    assert torch_pkg.version == torch.__version__ and torch_pkg.spec == ">=2.11" and torch_pkg.required
    assert package(report, "transformers").spec == "<6,>=5.6"
    assert {p.name for p in report.packages if p.required} >= {"torch", "transformers", "numpy", "pillow"}
    assert {p.name for p in report.packages if not p.required} >= {"flash-attn", "liger-kernel", "trl"}
    assert report.torch_cuda == torch.version.cuda
    assert set(report.backends) == set(dispatch.OPS) and all("cpu" in per_op for per_op in report.backends.values())
    assert report.attention["cpu"] == "sdpa"
    text = report.format()
    assert "result: supported" in text and f"torch                  {torch.__version__}" in text


@pytest.mark.parametrize("name, version, problem", [
    ("torch", "2.10.1", "torch 2.10.1 is outside >=2.11"),
    ("transformers", "4.57.6", "transformers 4.57.6 is outside <6,>=5.6"),
    ("transformers", "5.5.0", "transformers 5.5.0 is outside <6,>=5.6"),
    ("transformers", "6.0.0", "transformers 6.0.0 is outside <6,>=5.6"),
    ("pillow", None, "pillow not installed: pip install 'pillow'"),
])
def test_a_required_package_out_of_range_or_missing_fails_with_its_install_command(monkeypatch, capsys, name,
                                                                                    version, problem):
    fake_versions(monkeypatch, **{name: version})
    report = doctor.check(build_cpp=False)
    assert not report.ok and len(report.problems) == 1 and report.problems[0].startswith(problem)
    assert doctor.main(["--no-build"]) == 1
    out = capsys.readouterr().out
    assert ("missing" if version is None else "OUT OF RANGE") in out and "result: 1 problem(s)" in out


def test_versions_inside_the_ranges_pass_local_builds_and_nightlies_included(monkeypatch):
    fake_versions(monkeypatch, torch="2.11.0+cu130", triton="3.6.0", transformers="5.6.0")
    assert doctor.check(build_cpp=False).ok
    fake_versions(monkeypatch, torch="2.12.0.dev20260101+cu130", transformers="5.99.0")
    assert doctor.check(build_cpp=False).ok


def test_missing_optional_packages_are_reported_not_failed(monkeypatch, capsys):
    fake_versions(monkeypatch, flash_attn=None, liger_kernel="0.6.0")
    report = doctor.check(build_cpp=False)
    assert report.ok and not package(report, "flash-attn").ok and package(report, "liger-kernel").ok
    assert doctor.main(["--no-build"]) == 0
    out = capsys.readouterr().out
    assert "flash-attn" in out and "not installed" in out and "pip install flash-attn --no-build-isolation" in out


def test_a_requirement_whose_marker_excludes_this_platform_is_not_required(monkeypatch):
    monkeypatch.setattr(deps, "INSTALL_REQUIRES", [*deps.INSTALL_REQUIRES, "no-such-package>=1; platform_system == 'Plan9'"])
    report = doctor.check(build_cpp=False)
    assert report.ok and "no-such-package" not in {p.name for p in report.packages}


def test_python_outside_its_range_fails(monkeypatch):
    monkeypatch.setattr(deps, "PYTHON", ">=99")
    report = doctor.check(build_cpp=False)
    assert report.problems == [f"python {report.python} is outside >=99"]


def test_the_backend_table_is_the_dispatch_decision():
    with force_backend("torch"):
        assert all(per_op["cpu"] == "torch" for per_op in doctor.check().backends.values())
    with force_backend("triton"):  # TRITON_INTERPRET=1 in the tests: the CPU runs the Triton kernels
        backends = doctor.check().backends
    assert {op: b["cpu"] for op, b in backends.items()} == {
        "group_advantages": "triton", "policy_loss": "torch", "fused_linear_logprobs": "triton",
        "fused_linear_policy_loss": "triton"}
    if cpp.available():
        report = doctor.check()
        assert report.cpp["built"] and report.cpp["error"] is None
        assert {op: b["cpu"] for op, b in report.backends.items()} == {
            "group_advantages": "cpp", "policy_loss": "cpp", "fused_linear_logprobs": "torch",
            "fused_linear_policy_loss": "torch"}
        assert "C++ ops: built" in report.format()


def test_command_line_json_and_exit_code():
    """--no-imports: the commands' import probe (a second interpreter importing the trainer) is run from the
    command line by the shadowing test below, and in this process by the first test."""
    run = subprocess.run([sys.executable, "-m", "medix_fast.doctor", "--no-build", "--no-imports", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] and report["problems"] == [] and all("cpu" not in b for b in report["backends"].values())
    assert report["commands"] == "not checked"
    assert report["packages"][0]["name"] == "torch" and report["packages"][0]["version"] == torch.__version__


def test_each_op_runs_the_backend_the_table_names(monkeypatch):
    """The table is only worth reading if the ops follow it: every implementation gives the same
    numbers, so spies on each back-end's entry point show which one ran."""
    from medix_fast.kernels import fused_linear_logprobs, fused_linear_policy_loss, group_advantages, policy_loss

    # the modules (the package re-exports functions under some of their names)
    advantage, fused, logprobs, loss_module = (importlib.import_module(f"medix_fast.kernels.{m}") for m in
                                               ("advantage", "fused_policy_loss", "logprobs", "policy_loss"))

    ran = []

    def spy(module, name, label, flag=None):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if flag is None or args[flag]:
                ran.append(label)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(advantage.cpp, "group_advantages", ("group_advantages", "cpp"))
    spy(advantage, "_launch", ("group_advantages", "triton"))
    spy(loss_module.cpp, "policy_loss", ("policy_loss", "cpp"))
    spy(logprobs, "_triton_stats", ("fused_linear_logprobs", "triton"))
    spy(fused, "row_stats", ("fused_linear_policy_loss", "triton"), flag=2)
    h, w, t, mask = torch.randn(2, 3, 8, requires_grad=True), torch.randn(20, 8), torch.randint(0, 20, (2, 3)), \
        torch.ones(2, 3)  # with a gradient wanted, the fused loss takes its one-pass path
    for forced in ("torch", "triton") + (("cpp",) if cpp.available() else ()):
        with force_backend(forced):
            table = {op: b["cpu"] for op, b in doctor.check().backends.items()}
            ran.clear()
            group_advantages(torch.rand(4), group_size=2)
            policy_loss(torch.randn(2, 3), None, torch.randn(2), mask)
            fused_linear_logprobs(h, w, t)
            fused_linear_policy_loss(h, w, t, mask, torch.randn(2))
        assert set(ran) == {(op, b) for op, b in table.items() if b != "torch"}, forced


def test_a_command_that_cannot_start_here_is_one_problem_line_with_its_fix(monkeypatch, tmp_path):
    (tmp_path / "boom.py").write_text("raise RuntimeError('no GPU driver 999')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(doctor, "COMMAND_MODULES", ("medix_fast.export", "boom"))
    report = doctor.check(build_cpp=False)
    assert report.problems == [report.commands] and not report.ok
    assert report.commands.startswith("`python -m boom` cannot start here: RuntimeError: no GPU driver 999; fix: ")
    assert "constraints.txt" in report.commands and "\n" not in report.commands
    monkeypatch.setattr(doctor, "COMMAND_MODULES", ("medix_fast.export",))
    assert doctor.check(build_cpp=False).commands == "ok"


@pytest.mark.skipif(importlib.util.find_spec("transformers.integrations.hub_kernels") is None
                    or doctor.installed_version("kernels") is None,
                    reason="needs a transformers that imports the PyPI kernels package at start-up")
def test_a_folder_hiding_an_installed_package_is_named_with_the_fix(tmp_path):
    """Today's failure (transformers 5.25 importing the checkout's kernels/) as a user meets it: a
    directory whose kernels/ is not the package, and the doctor run from there."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("from medix_fast.kernels import *  # the old alias\n")
    run = subprocess.run([sys.executable, "-m", "medix_fast.doctor", "--no-build"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    problem = run.stdout.split("result: 1 problem(s)\n", 1)[1].strip()
    assert problem.startswith("- `python -m medix_fast.train` cannot start here: ImportError"), problem
    assert f"./kernels (in {tmp_path}) hides the installed package 'kernels'" in problem and "fix: " in problem


def test_versions_other_than_the_tested_set_are_noted_not_failed(monkeypatch, tmp_path):
    pins = tmp_path / "constraints.txt"
    pins.write_text(f"# tested set\ntorch==0.0.1\nnumpy=={doctor.installed_version('numpy')}\nno-such-dist==1.0\n")
    monkeypatch.setattr(doctor, "CONSTRAINTS", pins)
    report = doctor.check(build_cpp=False, imports=False)
    assert report.ok and report.unpinned == [f"torch {torch.__version__} (tested 0.0.1)"]
    assert f"differs from the tested set (constraints.txt): torch {torch.__version__} (tested 0.0.1)" in report.format()


def test_the_checkout_pins_what_is_installed_here():
    """CI installs with constraints.txt: the suite runs on exactly the pinned set (the newest-release
    step of .ci/run installs without it and skips this)."""
    if not os.environ.get("CI") or os.environ.get("MEDIX_UNPINNED") == "1":
        pytest.skip("CI's pinned install only (a developer's environment may drift; .ci/run's newest step is unpinned)")
    assert doctor.CONSTRAINTS.is_file() and doctor.check(build_cpp=False, imports=False).unpinned == []
