"""The embedded tiny checkpoints, built once and cached: ``ensure_tiny_model()`` (the text model
of :mod:`medix_fast.demo.tiny`), ``ensure_tiny_model(vl=True)`` (the VL variant of
:mod:`medix_fast.demo.tiny_vl`) and ``moe=True`` (the mixture-of-experts ones of
:mod:`medix_fast.demo.tiny_moe`, text or VL). ``model.path: tiny`` / ``tiny-vl`` / ``tiny-moe`` /
``tiny-vl-moe`` in a config means these (``TINY_NAMES``): the commands turn a config's model path
into a checkpoint directory with :func:`resolve_model_path` before ``model.loading`` loads it (the
model layer knows directories only; this one builds its tiny models with it).

The cache is ``$XDG_CACHE_HOME/medix_fast`` (default ``~/.cache/medix_fast``), one folder per
recipe digest and seed, e.g. ``~/.cache/medix_fast/tiny-1a2b3c4d-seed0``: a plain Hugging Face
checkpoint (``config.json``, ``model.safetensors``, the tokenizer with its chat template) that any
``from_pretrained`` reads.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile

from ..data import prompt
from ..data.loader import sample_path
from ..model.loading import checkpoint_dir
from . import tiny, tiny_moe, tiny_vl

TINY_NAMES = {"tiny": {}, "tiny-vl": {"vl": True}, "tiny-moe": {"moe": True}, "tiny-vl-moe": {"vl": True, "moe": True}}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir``, else ``$XDG_CACHE_HOME/medix_fast``, else ``~/.cache/medix_fast``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "medix_fast"


def recipe_digest(*extra: str) -> str:
    """8 hex digits naming the build recipe (this file, the prompt, the train data, ``extra``), so
    that a changed recipe never reuses a stale cached build."""
    digest = hashlib.sha256()
    extras = [pathlib.Path(e) for e in extra]
    for path in (pathlib.Path(tiny.__file__), pathlib.Path(prompt.__file__), sample_path("train"), *extras):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def ensure_tiny_model(seed: int = 0, cache_dir: str | os.PathLike | None = None, vl: bool = False,
                      moe: bool = False) -> pathlib.Path:
    """The cached tiny checkpoint ``<cache root>/tiny-<recipe>-seed<seed>`` (``tiny-vl-...``: the
    random vision-language variant of :mod:`medix_fast.demo.tiny_vl`; ``tiny[-vl]-moe-...``: the
    random mixture-of-experts ones of :mod:`medix_fast.demo.tiny_moe`), built if missing
    (atomically: into a temporary directory beside it, then renamed)."""
    root = cache_root(cache_dir)
    recipe = [m.__file__ for m, used in ((tiny_vl, vl), (tiny_moe, moe)) if used]
    path = root / f"tiny{'-vl' if vl else ''}{'-moe' if moe else ''}-{recipe_digest(*recipe)}-seed{seed}"
    if path.is_dir():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
    try:
        if moe:
            tiny_moe.build_tiny_moe(tmp, ensure_tiny_model(seed, cache_dir, vl=vl), seed, vl=vl)
        elif vl:
            tiny_vl.build_tiny_vl(tmp, ensure_tiny_model(seed, cache_dir), seed)
        else:
            tiny.build_tiny(tmp, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():  # not a concurrent builder that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model_path(path: str | os.PathLike) -> pathlib.Path:
    """``"tiny"`` / ``"tiny-vl"`` / ``"tiny-moe"`` / ``"tiny-vl-moe"`` -> the cached embedded tiny
    model (``TINY_NAMES``); otherwise an existing checkpoint directory (``model.loading.checkpoint_dir``)."""
    if str(path) in TINY_NAMES:
        return ensure_tiny_model(**TINY_NAMES[str(path)])
    return checkpoint_dir(path)
