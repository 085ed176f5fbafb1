"""A checkpoint's trainer state and RNG states, written as data: nothing in them can run when read.

    trainer_state.json        step, scheduler, data-loader position, counters, world size, run id
    rng_rank<R>.safetensors   rank R's RNG states: torch's (CPU, each CUDA device's), python's and
                              numpy's Mersenne-Twister words as tensors; their few other fields as
                              JSON in the file's metadata

Checkpoints written before this format hold ``trainer_state.pt`` and ``rng_rank<R>.pt`` (pickles);
they are still read, by ``safe_load.torch_load_plain`` (``weights_only=True``), so a pickle naming
anything but tensors, plain data and numpy arrays is refused. JSON keeps every float exactly
(shortest repr), so a resume stays bit-exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .safe_load import torch_load_plain

TRAINER, LEGACY_TRAINER = "trainer_state.json", "trainer_state.pt"


def trainer_file(path: Path) -> Path | None:
    """Checkpoint ``path``'s trainer-state file (this format's, else an older one's), None if neither."""
    return next((path / name for name in (TRAINER, LEGACY_TRAINER) if (path / name).is_file()), None)


def rng_file(path: Path, rank: int) -> Path:
    """Rank ``rank``'s RNG file in checkpoint ``path``, in the format of its trainer-state file."""
    legacy = trainer_file(path) == path / LEGACY_TRAINER
    return path / f"rng_rank{rank}.{'pt' if legacy else 'safetensors'}"


def write_trainer_state(state: dict, file: Path) -> None:
    file.write_text(json.dumps(state, indent=1))


def read_trainer_state(file: Path) -> dict:
    state = torch_load_plain(file) if file.suffix == ".pt" else json.loads(file.read_text())
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a mapping")
    return state


def write_rng(state: dict, file: Path) -> None:
    """``state``: ``checkpoint.rng_state()``'s python / numpy / torch (/ cuda) states."""
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"python": torch.tensor(words, dtype=torch.int64), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "torch": state["torch"], **{f"cuda{i}": s for i, s in enumerate(state.get("cuda", []))}}
    fields = {"python": [version, gauss], "numpy": [kind, pos, has_gauss, cached]}
    save_file(tensors, file, metadata={"fields": json.dumps(fields)})


def read_rng(file: Path) -> dict:
    """What :func:`write_rng` wrote (or an older checkpoint's pickle held)."""
    if file.suffix == ".pt":
        return torch_load_plain(file)
    with safe_open(file, "pt") as f:
        fields = json.loads(f.metadata()["fields"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    (version, gauss), (kind, pos, has_gauss, cached) = fields["python"], fields["numpy"]
    state = {"python": (version, tuple(tensors["python"].tolist()), gauss),
             "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors["torch"]}
    cuda = [tensors[f"cuda{i}"] for i in range(sum(name.startswith("cuda") for name in tensors))]
    if cuda:
        state["cuda"] = cuda
    return state
