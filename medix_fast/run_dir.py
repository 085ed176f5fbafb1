"""The training output directory: a new run never writes over an old one.

    claim_output_dir("runs/tiny", resume=False, overwrite=False)   # before anything is written

A directory holding anything is a previous run. Starting a new run there would truncate its
``metrics.jsonl`` and mix its checkpoints with the new ones (pruning could then delete the new
run's and keep the old run's), so a new run refuses to start, with what to do instead:
``--resume`` continues the previous run from its latest checkpoint, ``--overwrite`` moves it
aside to ``<dir>.old-<N>`` (nothing is deleted) and starts afresh. ``--resume`` on a run of this
trainer with no finished checkpoint yet (a crash before the first save, restarted by ``torchrun
--max-restarts``) starts from step 0, the earlier attempt's steps set aside as below; on a
directory holding anything the trainer does not write (:func:`is_trainer_run`) it refuses. Every
rank checks (they agree: nothing is written before); only rank 0 moves the old run.

Resuming at an earlier step than the run reached (``--resume-from <dir>/checkpoints/step_N``
into ``<dir>`` itself: a roll back in place) abandons the later steps: :func:`set_aside_after`
moves their checkpoints, evaluations, rollouts and metric rows into ``<dir>/abandoned-<K>/``.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

from .checkpoint import latest_checkpoint
from .errors import UserError

# What the trainer writes in its output directory (besides ``abandoned-<K>/``); its first
# files (``config.yaml``, and ``dropped_rows.txt`` before it when many rows are dropped) mark a run.
WRITTEN = {"config.yaml", "dropped_rows.txt", "metrics.jsonl", "rewards.png", "checkpoints", "eval", "rollouts",
           "tensorboard", "wandb"}
FIRST = {"config.yaml", "dropped_rows.txt"}


def foreign(names: list[str]) -> list[str]:
    """The names among ``names`` (a directory's entries) that the trainer never writes."""
    return [n for n in names if n not in WRITTEN and not re.fullmatch(r"abandoned-\d+", n)]


def is_trainer_run(path: Path) -> bool:
    """Whether ``path`` holds a run of this trainer: one of its first files, and nothing it does not write."""
    held = [p.name for p in path.iterdir()] if path.is_dir() else []
    return bool(FIRST.intersection(held)) and not foreign(held)


def claim_output_dir(path: str | os.PathLike, resume: bool, overwrite: bool, is_main: bool = True) -> Path | None:
    """Check that a run may start in ``path``; with ``overwrite``, move a previous run aside
    (rank 0) and return where it went. Raises :class:`UserError` saying what to do otherwise."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or move it aside")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file, not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held or (resume and (latest_checkpoint(out) is not None or is_trainer_run(out))):
        return None
    if not overwrite:
        names = (foreign(held) or held) if resume else held  # what makes it no run of this trainer
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        what = "no checkpoint to resume from and is no run of this trainer" if resume else "a previous run"
        raise UserError(f"train.output_dir {out} holds {what} ({shown}): "
                        + ("" if resume else "add --resume to continue it, ")
                        + "add --overwrite to move it aside and start again, or give another "
                        "train.output_dir=...")
    return move_aside(out) if is_main else None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<path>.old-<N>`` (N = 1, 2, ...) and return it: nothing deleted."""
    aside = next(p for k in itertools.count(1) if not (p := path.with_name(f"{path.name}.old-{k}")).exists())
    os.rename(path, aside)
    return aside


def set_aside_after(out: Path, step: int) -> Path | None:
    """Move what a run wrote after ``step`` (a branch abandoned by resuming at ``step``: later
    checkpoints, evaluations and rollouts, and the ``metrics.jsonl`` rows of later steps) into
    ``<out>/abandoned-<K>/``, so the resumed run never mixes with it and nothing is lost; returns it."""
    from .metrics import read_metrics, truncate_after

    def later(folder: Path, pattern: str) -> list[Path]:
        found = [(p, re.match(r"step_(\d+)", p.name)) for p in folder.glob(pattern)] if folder.is_dir() else []
        return [p for p, m in found if m and int(m.group(1)) > step]

    moved = {sub: later(out / sub, pattern) for sub, pattern in
             (("checkpoints", "step_*"), ("eval", "step_*"), ("rollouts", "step_*.jsonl"))}
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > step]
    if not rows and not any(moved.values()):
        return None
    aside = next(p for k in itertools.count(1) if not (p := out / f"abandoned-{k}").exists())
    aside.mkdir()
    if rows:
        (aside / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        truncate_after(out / "metrics.jsonl", step)
    for sub, paths in moved.items():
        for path in paths:
            (aside / sub).mkdir(exist_ok=True)
            os.rename(path, aside / sub / path.name)
    return aside
