"""The checkout's ``kernels/`` folder never hides the PyPI package ``kernels``.

``kernels/`` is installed as ``medix_fast.kernels``; run from the checkout's root (``python -m``,
pytest, the README's commands) the folder is also on ``sys.path`` as a top-level ``kernels``.
transformers >= 5.25 imports the PyPI ``kernels`` at start-up (``from kernels import
CUDAProperties``), so the folder must step aside: these tests import it from the root, with a
stand-in distribution installed, with the real one if present, and with none.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata, util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(code: str, cwd: Path = ROOT, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _installed(dist: str) -> bool:
    try:
        return bool(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture
def stand_in(tmp_path) -> Path:
    """A fake ``kernels`` distribution (package + dist-info), as pip would lay it out."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\nFROM_PYPI = True\n")
    (tmp_path / "kernels" / "layers.py").write_text("WHERE = 'stand-in submodule'\n")
    info = tmp_path / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    (info / "top_level.txt").write_text("kernels\n")
    return tmp_path


def test_the_stand_in_is_imported_from_the_root(stand_in):
    done = run("""
        import sys, kernels, kernels.layers
        assert kernels.FROM_PYPI and kernels.CUDAProperties == 'stand-in', kernels.__file__
        assert kernels.layers.WHERE == 'stand-in submodule'
        assert sys.modules['kernels'] is kernels
        import medix_fast.kernels as ours
        assert ours.policy_loss and ours is not kernels and ours.__name__ == 'medix_fast.kernels'
        print(kernels.__file__)
    """, pythonpath=str(stand_in))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(stand_in / "kernels" / "__init__.py")


def test_without_the_package_the_name_is_not_ours():
    """With no ``kernels`` anywhere else on sys.path, ``import kernels`` from the root fails as it
    would without this folder, and medix_fast.kernels still imports."""
    done = run("""
        import sys
        sys.path[:] = [p for p in sys.path if 'site-packages' not in p]
        try:
            import kernels
        except ModuleNotFoundError as exc:
            assert exc.name == 'kernels' and 'kernels' not in sys.modules, exc
        else:
            raise AssertionError(f'imported {kernels.__file__}')
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("import medix_fast.kernels as k; assert k.group_advantages and k.__name__ == 'medix_fast.kernels'")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(util.find_spec("transformers.integrations.hub_kernels") is None or not _installed("kernels"),
                    reason="needs a transformers with the hub_kernels integration and the PyPI kernels package")
def test_transformers_hub_kernels_imports_from_the_root():
    """What broke every command with transformers 5.25: its start-up import of the PyPI ``kernels``."""
    done = run("import transformers.integrations.hub_kernels, transformers; transformers.PreTrainedModel")
    assert done.returncode == 0, done.stderr[-3000:]
