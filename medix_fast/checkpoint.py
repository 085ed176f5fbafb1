"""Checkpoints: the model in Hugging Face format plus everything needed to resume exactly.

Layout of ``<output_dir>/checkpoints/step_00000012/``:
    model/               save_pretrained + tokenizer (loadable by transformers and vLLM as-is)
    optimizer.pt         optimizer state (full, gathered on rank 0 under FSDP)
    trainer_state.pt     step, scheduler, data-loader state, counters
    rng_rank<R>.pt       python / numpy / torch (CPU and CUDA) RNG states of each rank

A checkpoint is written into ``.tmp_step_...`` and renamed into place when complete, so a run
killed at any moment leaves either the previous checkpoints or the new one, never half of one.
Only the newest ``keep_last`` are kept. :func:`latest_checkpoint` finds the one to ``--resume``.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, *, model_state: dict | None, save_model, tokenizer,
                    optimizer_state: dict | None, trainer_state: dict, rank: int = 0, keep_last: int = 2,
                    barrier=lambda: None) -> Path:
    """Write checkpoint ``step`` atomically; returns its final path.

    ``save_model(dir, state_dict)`` writes the HF model (rank 0). ``model_state`` and
    ``optimizer_state`` are full (unsharded) state dicts on rank 0 and may be None elsewhere.
    Every rank writes its own RNG state; ``barrier`` synchronises the ranks (distributed runs).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_model(tmp / "model", model_state)
        tokenizer.save_pretrained(tmp / "model")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _fsync_tree(path: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def load_trainer_state(path: str | Path, rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(trainer_state, optimizer_state or None, this rank's RNG state) of a checkpoint."""
    path = Path(path)
    trainer = torch.load(path / "trainer_state.pt", weights_only=False)
    opt_file = path / "optimizer.pt"
    optimizer = torch.load(opt_file, weights_only=False, map_location="cpu") if opt_file.exists() else None
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise UserError(f"{rng_file} missing: was the checkpoint written with a different world size?")
    return trainer, optimizer, torch.load(rng_file, weights_only=False)
