"""Install medix_fast.

The top-level folder ``kernels/`` is installed as ``medix_fast.kernels`` (never as a
top-level ``kernels`` module: another PyPI package owns that name). The kernels need only
torch and triton; everything else is for the trainer.

CPU machines: ``pip install torch==2.13.0`` first (the CPU build), then ``pip install -e ".[test]"``.

The C++/CUDA ops of ``csrc/`` (shipped as ``medix_fast/csrc``) are not built here: pip's isolated
build has no torch to build against, so ``medix_fast.kernels.cpp`` compiles them at first use
(``python -m medix_fast.kernels`` prebuilds); without a compiler the PyTorch paths run.

The dependency ranges are declared in ``medix_fast/deps.py`` (``python -m medix_fast.doctor``
checks an environment against them).
"""
import runpy
from pathlib import Path

from setuptools import find_packages, setup

deps = runpy.run_path(str(Path(__file__).resolve().parent / "medix_fast" / "deps.py"))

packages = [p for p in find_packages(include=["medix_fast", "medix_fast.*"])]
packages += ["medix_fast.kernels", "medix_fast.configs", "medix_fast.csrc"]

setup(
    name="medix_fast",
    version="0.1.0",
    description="Performance-first GRPO/DAPO/GSPO trainer for clinical QA (MediX-R1 recipe) with fused Triton kernels",
    python_requires=deps["PYTHON"],
    packages=packages,
    package_dir={"medix_fast.kernels": "kernels", "medix_fast.configs": "configs", "medix_fast.csrc": "csrc"},
    include_package_data=True,
    package_data={"medix_fast.data": ["sample/*.jsonl", "sample/images/*.png"], "medix_fast.configs": ["*.yaml", "eval/*.yaml"],
                  "medix_fast.csrc": ["*.cpp", "*.h"]},
    install_requires=deps["INSTALL_REQUIRES"],
    extras_require=deps["EXTRAS"],
)
