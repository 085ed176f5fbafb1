"""Is this environment one medix_fast supports, and what will run here?

    python -m medix_fast.doctor            # prints the report; exit 1 if a required package is missing or out of range
    python -m medix_fast.doctor --json     # the same report as JSON
    python -m medix_fast.doctor --no-build # skip the C++ ops (their build takes a minute the first
                                           # time) and so the CPU column of the back-end table
    python -m medix_fast.doctor --no-imports # skip importing the commands (a few seconds)

    from medix_fast.doctor import check
    report = check()                       # a Report: .ok, .problems, .to_dict(), .format()

It reads the installed versions of Python and of every package ``medix_fast/deps.py`` declares
(torch with its CUDA, triton, transformers, ...; the optional flash-attn, liger-kernel, trl, ...),
compares them with the declared ranges, lists the CUDA devices, builds the C++ ops of ``csrc/``,
and prints which back-end each kernel op takes on each device (``medix_fast.kernels.dispatch``)
and which attention the policy forward uses, with the command that installs what is missing.

It also imports what every command imports (``train``, ``eval``, ``export``, ``generate``, the
demo builders), in a fresh process started in the directory it is run from, as the commands are:
a command that could not start there is one problem line naming the cause and the fix, e.g. a
folder of this directory that hides an installed package of the same name. And it compares the
installed versions with the tested set pinned in the checkout's ``constraints.txt`` (a note, not
a problem: the declared ranges are what is supported, the pins what CI last ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import deps


@dataclasses.dataclass
class Package:
    name: str  # distribution name
    version: str | None  # installed version, None when not installed
    spec: str  # declared range ("" = any version)
    required: bool
    ok: bool  # installed and inside ``spec``
    hint: str  # what to run (and, for an optional package, what it buys)


@dataclasses.dataclass
class Report:
    python: str
    python_spec: str
    packages: list[Package]
    torch_cuda: str | None  # torch.version.cuda: None for a CPU build
    devices: list[str]  # one line per visible CUDA device
    cpp: dict  # {"built": bool, "error": str | None}: the C++ ops (CPU only)
    backends: dict[str, dict[str, str]]  # op -> device type -> "cpp" | "triton" | "torch" | "error: ..."
    # (no "cpu" column without the C++ build: the CPU choice depends on it)
    attention: dict[str, str]  # device type -> attention implementation of the policy forward
    problems: list[str]  # why a required piece is not usable; empty = supported
    commands: str = "not checked"  # "ok" when every command's modules import here, else why not
    unpinned: list[str] = dataclasses.field(default_factory=list)  # "name installed (tested pinned)"

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def format(self) -> str:
        lines = [f"python {self.python} {'ok' if _in(self.python, self.python_spec) else 'OUT OF RANGE'} "
                 f"({self.python_spec})"]
        for required in (True, False):
            lines.append("required packages:" if required else "optional packages:")
            for p in (p for p in self.packages if p.required == required):
                state = "ok" if p.ok else ("missing" if p.version is None else "OUT OF RANGE")
                if not required and p.version is None:
                    state = "not installed"
                lines.append(f"  {p.name:22s} {p.version or '-':16s} {state:14s} {p.spec or 'any'}")
                if not p.ok:
                    lines.append(f"      {p.hint}")
        build = f"CUDA {self.torch_cuda}" if self.torch_cuda else "CPU build"
        lines.append(f"torch build: {build}; CUDA devices: {len(self.devices) or 'none'}")
        lines += [f"  {d}" for d in self.devices]
        cpp = self.cpp
        state = "built (CPU)" if cpp["built"] \
            else "not built" if cpp["error"] is None else f"unavailable: {cpp['error']}"
        lines.append(f"C++ ops: {state}")
        devices = sorted({d for per_op in self.backends.values() for d in per_op})
        lines.append("kernel back-ends (" + ", ".join(devices) + "):" if self.backends
                     else "kernel back-ends: not checked (on the CPU they depend on the C++ build)")
        for op, per_op in self.backends.items():
            lines.append(f"  {op:26s} " + "  ".join(f"{per_op[d]:8s}" for d in devices))
        lines.append("policy attention: " + ", ".join(f"{d} {a}" for d, a in self.attention.items()))
        lines.append(f"commands from {os.getcwd()}: {self.commands}")
        if self.unpinned:
            lines.append(f"differs from the tested set ({CONSTRAINTS.name}): " + ", ".join(self.unpinned))
        lines.append("result: supported" if self.ok else
                     f"result: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems))
        return "\n".join(lines)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _in(version: str, spec: str) -> bool:
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)  # nightlies / local builds count
    except InvalidVersion:
        return False


def _packages() -> list[Package]:
    out = []
    for line in deps.INSTALL_REQUIRES:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue  # e.g. triton off Linux
        version, spec = installed_version(req.name), str(req.specifier)
        out.append(Package(req.name, version, spec, True, version is not None and _in(version, spec),
                           deps.INSTALL.get(req.name, f"pip install '{req.name}{spec}'")))
    for name, use in deps.OPTIONAL_USE.items():
        version = installed_version(name)
        out.append(Package(name, version, "", False, version is not None,
                           f"{use}: {deps.INSTALL.get(name, f'pip install {name}')}"))
    return out


def _devices() -> list[str]:
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.1f} GiB")
    return out


def _cpp(build: bool) -> dict:
    from .kernels import cpp

    if not build:
        return {"built": False, "error": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the build failure is reported below instead
        built = cpp.available()
    return {"built": built, "error": cpp.unavailable_reason()}


def _backends(device_types: list[str]) -> dict[str, dict[str, str]]:
    import torch

    from .kernels import dispatch

    out = {}
    for op in dispatch.OPS:
        out[op] = {}
        for dev in device_types:
            try:
                out[op][dev] = dispatch.backend_for(op, torch.empty(0, device=dev))
            except RuntimeError as exc:  # a forced back-end that cannot run here
                out[op][dev] = f"error: {exc}"
    return out


def _attention(device_types: list[str]) -> dict[str, str]:
    from .model.loading import attention_backend

    return {dev: attention_backend(dev) for dev in device_types}


# What ``python -m medix_fast.<command>`` imports: its command line, then what it runs (the command
# lines themselves import torch only after reading their arguments).
COMMAND_MODULES = ("medix_fast.train", "medix_fast.trainer", "medix_fast.eval.cli", "medix_fast.eval.medix_r1",
                   "medix_fast.export", "medix_fast.checkpoint", "medix_fast.generate.__main__",
                   "medix_fast.generate.memory", "medix_fast.model.footprint", "medix_fast.demo.tiny")
RUN_BY = {"medix_fast.trainer": "medix_fast.train", "medix_fast.eval.medix_r1": "medix_fast.eval",  # module -> command
          "medix_fast.checkpoint": "medix_fast.export", "medix_fast.generate.memory": "medix_fast.generate",
          "medix_fast.model.footprint": "medix_fast.generate"}
# The tested set: pip's constraints file at the checkout's root (absent in a wheel install).
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
_IMPORT_PROBE = """
import importlib, json, os, sys
from importlib import metadata
cwd, out = os.getcwd(), {"shadowed": [], "failed": None}
for name, dists in sorted(metadata.packages_distributions().items()):
    local = os.path.join(cwd, name)
    if "medix_fast" in {d.replace("-", "_") for d in dists} or not (
            os.path.isfile(os.path.join(local, "__init__.py")) or os.path.isfile(local + ".py")):
        continue
    try:
        where = os.path.abspath(importlib.import_module(name).__file__ or "")
    except Exception as exc:
        where = local
    if where == local + ".py" or where.startswith(local + os.sep):
        out["shadowed"].append([name, f"{dists[0]} {metadata.version(dists[0])}"])
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except BaseException as exc:
        out["failed"] = [module, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
        break
print(json.dumps(out))
"""


def _commands() -> str:
    """'ok', or the one line saying why a command cannot start in this directory and what to do."""
    return _probe(os.getcwd(), COMMAND_MODULES)


@functools.lru_cache(maxsize=None)
def _probe(cwd: str, modules: tuple[str, ...]) -> str:
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *modules], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return f"could not be checked (the probe exited {done.returncode}: {done.stderr.strip()[-300:]})"
    shadows = "; ".join(f"./{name} (in {cwd}) hides the installed package {name!r} ({dist})"
                        for name, dist in found["shadowed"])
    if found["failed"] is None:
        return "ok" if not shadows else f"ok, but {shadows}"
    module, error = found["failed"]
    command = "python -m " + RUN_BY.get(module, module.removesuffix(".__main__").removesuffix(".cli"))
    if shadows:
        names = ", ".join(f"./{name}" for name, _ in found["shadowed"])
        return (f"`{command}` cannot start here: {error}; cause: {shadows}; fix: run it from another directory, "
                f"or rename {names} (a medix_fast checkout older than its kernels/ shim: update it)")
    return (f"`{command}` cannot start here: {error}; fix: install the tested set, "
            f"pip install -c {CONSTRAINTS} -e '.[test]' (or the versions the error names)")


def _unpinned() -> list[str]:
    """Installed packages whose version is not the one pinned in ``constraints.txt``."""
    if not CONSTRAINTS.is_file():
        return []
    out = []
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, pinned = (part.strip() for part in line.split("==", 1))
        installed = installed_version(name)
        if installed is not None and _public(installed) != _public(pinned):
            out.append(f"{name} {installed} (tested {pinned})")
    return out


def _public(version: str) -> str:
    try:
        return Version(version).public  # 2.13.0+cpu and 2.13.0+cu130 are the tested 2.13.0
    except InvalidVersion:
        return version


def check(*, build_cpp: bool = True, imports: bool = True) -> Report:
    """The report for this environment (see the module docstring). Needs only torch and packaging
    to run; every missing or out-of-range required package is listed in ``problems``, and so is a
    command that cannot start in the current directory (``imports=False`` skips that check)."""
    python = platform.python_version()
    packages = _packages()
    problems = [] if _in(python, deps.PYTHON) else [f"python {python} is outside {deps.PYTHON}"]
    for p in packages:
        if p.required and not p.ok:
            state = "not installed" if p.version is None else f"{p.version} is outside {p.spec}"
            problems.append(f"{p.name} {state}: {p.hint}")
    try:
        import torch
    except ImportError:
        return Report(python, deps.PYTHON, packages, None, [], {"built": False,
                      "error": "torch is not importable"}, {}, {}, problems)
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        attention = _attention(device_types)
    except ImportError as exc:  # transformers missing or broken: already a problem above
        attention = {dev: f"unknown ({exc})" for dev in device_types}
    commands = _commands() if imports else "not checked"
    if commands != "not checked" and not commands.startswith("ok"):
        problems.append(commands)
    return Report(python, deps.PYTHON, packages, torch.version.cuda, _devices(), _cpp(build_cpp),
                  _backends([d for d in device_types if build_cpp or d != "cpu"]), attention, problems,
                  commands, _unpinned())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medix_fast.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-build", action="store_true", help="do not build the C++ ops")
    parser.add_argument("--no-imports", action="store_true", help="do not import the commands")
    args = parser.parse_args(argv)
    report = check(build_cpp=not args.no_build, imports=not args.no_imports)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
