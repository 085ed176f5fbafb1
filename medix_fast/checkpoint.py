"""Training checkpoints: sharded model + optimizer state written by every rank, published atomically.

Layout of ``<output_dir>/checkpoints/step_00000012/``:
    state/             torch.distributed.checkpoint (DCP): model (``model.*``, the Hugging Face
                       parameter names) and optimizer (``optimizer.*``) state, each rank writing
                       its own shards (``__<rank>_0.distcp``) in parallel, rank 0 the ``.metadata``
    trainer_state.json step, scheduler, data-loader position, counters, world size, run id
    rng_rank<R>.safetensors  python / numpy / torch (CPU and CUDA) RNG states of rank R
    hf_config/         config, generation config, tokenizer (and a VL model's image processor):
                       what ``python -m medix_fast.export`` needs besides state/
    model/             a Hugging Face model (``from_pretrained``-able), only in the last step's
                       checkpoint and every ``checkpoint.save_hf_every`` steps

Atomic: everything is written into ``.tmp_step_...``; when every rank's part is on disk
(fsynced), rank 0 renames it into place, so a run killed at any moment leaves the previous
checkpoints and never half of one (a stale ``.tmp_*`` is removed at the next start). A checkpoint
is complete when it has ``trainer_state.json`` (``trainer_state.pt``: an older format's) and
``state/.metadata``; only complete ones are listed, resumed from, or counted by ``keep_last``.
Every shard file carries a CRC-32 computed as it is written, kept in ``state/.metadata``
(``checksums.py``); resume and export verify them before reading anything, so a damaged shard is
one ``corrupt checkpoint: ... fails its checksum`` line, never silently trained on. Every shard
is verified whatever number of processes reads it: rank r of W checks the files r, r + W, ...
(sorted by name), so one process checks them all, and each file is read once.

Nothing in a checkpoint runs when it is read (``checkpoint_files.py``: trainer and RNG state as
JSON and safetensors; ``safe_load.py``: DCP's pickles through allowlists): a checkpoint from
elsewhere naming code is one ``refused: ...`` line.

Async (``checkpoint.async_save``): :meth:`Checkpointer.save` copies this rank's shards to host
memory (DCP's staging copy), starts the write in a background thread over a process group of its
own (gloo, so it never interleaves with the training collectives) and returns: training
continues while the files are written. With ``checkpoint.keep_staging`` (default) the copy goes
into buffers kept from one save to the next (pinned on CUDA, no allocation or page faults after
the first save; one host copy of the rank's shards stays resident); without it each save
allocates its copy and frees it once written. Rank 0 publishes the checkpoint as soon as its
write is done (:meth:`Checkpointer.poll` after every step); a new save, a new
:class:`Checkpointer` or resume in the same process (:func:`wait_all`), the end of the run and a
diverged run first wait for the one in flight (:meth:`Checkpointer.wait`), so none is lost. A
crash or kill mid-write loses only that one: its ``.tmp_step_...`` is never published.

Pruning: after publishing, the checkpoints of this run (same ``run_id``, kept across resumes) up
to the current step beyond the newest ``keep_last`` are removed, all but a ``model/`` in them
(the last step's and every ``save_hf_every``-th: those stay evaluable); one without is removed
whole. Checkpoints of other runs in the same directory, and later steps left by an
abandoned branch (``--resume-from`` an earlier step; the trainer moves those to
``abandoned-<K>/``, ``run_dir.set_aside_after``), are never touched.

Resume on another world size (``--resume`` with a different number of processes, or another
``distributed.strategy``): DCP re-shards model and optimizer state on load; the data loader's
position is one global stream position (every rank takes its slice of the same global batches,
``data/loader.py``), so it carries over as is; the RNG streams are per rank: at the saved world
size each rank continues its own, at another one rank r's generators are re-seeded from
``(train.seed, step, r)`` (:func:`derived_seed`), deterministic but not the uninterrupted run's
draws (the sampler's seeds already depend only on seed, step, rank and attempt).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed as D
from .checkpoint_files import TRAINER, read_rng, read_trainer_state, rng_file, trainer_file, write_rng, \
    write_trainer_state
from .checksums import first_mismatch
from .errors import UserError
from .safe_load import Refused

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE, HF_CONFIG, HF_MODEL = "state", "hf_config", "model"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be used: incomplete, corrupt or of another model."""


_FAILED = D.DCP_ERRORS


def _why(err: BaseException) -> str:
    """One line on what went wrong; for DCP's, the first failing rank's own error."""
    if getattr(err, "failures", None):
        rank, (inner, _) = next(iter(sorted(err.failures.items())))
        return f"rank {rank}: {_why(inner)}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    return trainer_file(path) is not None and (path / STATE / ".metadata").is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- RNG
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


def derived_seed(seed: int, step: int, rank: int) -> int:
    """Rank ``rank``'s seed after resuming at ``step`` on another world size."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def restore_rng(path: Path, rank: int, world: int, seed: int) -> None:
    """This rank's saved RNG streams (same world size as saved), else ones seeded by :func:`derived_seed`."""
    state = load_trainer_state(path)
    if state["world"] == world:
        set_rng_state(_load(read_rng, rng_file(path, rank), path))
        return
    s = derived_seed(seed, state["step"], rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # CUDA generators too
    log.info("world size %d -> %d: rank %d's RNG re-seeded from (seed, step, rank)", state["world"], world, rank)


# ----------------------------------------------------------------------------- checking and reading
def check_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a complete, readable checkpoint; else a one-line :class:`CheckpointError`."""
    path = Path(path)
    if trainer_file(path) is None:
        raise CheckpointError(f"{path}: not a checkpoint directory (no {TRAINER})")
    metadata = read_metadata(path)
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sorted(sizes.items()):
        file = path / STATE / name
        if not file.is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint: {STATE}/{name} is missing")
        if file.stat().st_size < needed:
            raise CheckpointError(f"{path}: incomplete checkpoint: {STATE}/{name} has {file.stat().st_size} "
                                  f"bytes, the metadata needs {needed}")
    state = load_trainer_state(path)
    missing = [rng_file(path, r) for r in range(state["world"]) if not rng_file(path, r).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint: {missing[0].name} is missing "
                              f"(written by {state['world']} rank{'s' * (state['world'] != 1)})")
    _verify_checksums(path, getattr(metadata, "checksums", None) or {})
    return path


def _verify_checksums(path: Path, checksums: dict[str, str]) -> None:
    """Every shard file against its CRC-32 from the metadata (checkpoints older than the checksums
    have none); the ranks share the files and agree on the first bad one."""
    rank, world = D.rank_and_world()
    mine = sorted(checksums)[rank::world]
    bad = first_mismatch(path / STATE, {name: checksums[name] for name in mine})
    found = sorted(b for b in D.broadcast_object(D.gather_objects(bad)) if b)
    if found:
        raise CheckpointError(f"{path}: corrupt checkpoint: {STATE}/{found[0]} fails its checksum")


def read_metadata(path: Path):
    """The DCP metadata of checkpoint ``path`` (what each tensor is and which file holds it)."""
    file = path / STATE / ".metadata"
    if not file.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint: no {STATE}/.metadata")
    try:
        return D.shards_metadata(path / STATE)
    except Refused as err:
        raise _refused(path, f"{STATE}/.metadata", err) from None
    except _FAILED as err:
        raise CheckpointError(f"{path}: corrupt checkpoint: {STATE}/.metadata unreadable "
                              f"({_why(err)})") from err


def _refused(path: Path, name: str, err: Refused) -> CheckpointError:
    return CheckpointError(f"{path}: refused: {name} names {err}, which is code, not checkpoint data "
                           "(loading it would run it)")


def _load(read: Callable[[Path], dict], file: Path, path: Path) -> dict:
    try:
        return read(file)
    except Refused as err:
        raise _refused(path, file.name, err) from None
    except Exception as err:
        raise CheckpointError(f"{path}: corrupt checkpoint: {file.name} unreadable "
                              f"({_why(err)})") from err


def load_trainer_state(path: Path) -> dict:
    """step, scheduler, loader, counters, ``world`` (ranks that wrote it) and ``run_id``."""
    file = trainer_file(path) or path / TRAINER
    state = _load(read_trainer_state, file, path)
    missing = [key for key in ("step", "world", "run_id") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: corrupt checkpoint: {file.name} has no {missing[0]!r}")
    return state


def has_optimizer(path: Path) -> bool:
    return any(key.startswith("optimizer.") for key in read_metadata(path).state_dict_metadata)


def check_model(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise a one-line :class:`CheckpointError` unless checkpoint ``path`` holds a model with
    exactly these parameter names and (global) shapes."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in read_metadata(path).state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    missing, extra = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or extra:
        example = f"{missing[0]} not in the checkpoint" if missing else f"{extra[0]} not in this model"
        raise CheckpointError(f"{path}: checkpoint of another model: {len(missing)} tensors missing and "
                              f"{len(extra)} unexpected ({example})")
    for key, shape in sorted(shapes.items()):
        if saved[key] != tuple(shape):
            raise CheckpointError(f"{path}: checkpoint of another model: {key} is {list(saved[key])} there, "
                                  f"{list(shape)} here")


def load_state(path: Path, state: dict, no_dist: bool = False) -> None:
    """Fill ``state`` (a DCP state dict: this rank's shards, or whole tensors) from checkpoint ``path``,
    re-sharding as needed; a read failure is a one-line :class:`CheckpointError`."""
    try:
        D.load_shards(state, path / STATE, alone=no_dist)
    except _FAILED as err:
        refused = _refusal(err)
        if refused is not None:
            raise _refused(path, f"a non-tensor entry of {STATE}/", refused) from None
        raise CheckpointError(f"{path}: cannot load {STATE}/ "
                              f"({_why(err)})") from err


def _refusal(err: BaseException | None) -> Refused | None:
    """The :class:`Refused` inside DCP's error (its per-rank failures, the causes), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Refused):
            return err
        for inner, _ in (getattr(err, "failures", None) or {}).values():
            if found := _refusal(inner):
                return found
        err = err.__cause__ or err.__context__
    return None


# ----------------------------------------------------------------------------- writing
def _save(write: Callable[[dict, Path], None], obj: dict, file: Path) -> None:
    write(obj, file)
    _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_bytes(state) -> int:
    """Bytes of every tensor in a (nested) state dict, whole (global) sizes: about what DCP writes."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def _disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (its causes, DCP's per-rank failures) is a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or "unexpected pos" in str(err):
            return True
        if any(_disk_full(inner) for inner, _ in (getattr(err, "failures", None) or {}).values()):
            return True
        err = err.__cause__ or err.__context__
    return False


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


_IN_FLIGHT: set[Checkpointer] = set()  # this process's checkpointers with a save being written


def wait_all() -> None:
    """Finish every save in flight in this process (before a resume or a new run reads the directory)."""
    for ckpt in list(_IN_FLIGHT):
        ckpt.wait()


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


class Checkpointer:
    """Writes the checkpoints of one run (every rank holds one; see the module docstring).

    ``run_id`` tells this run's checkpoints from others' in the same directory (rank 0's is the
    one written). ``async_save`` writes in the background; False blocks until published.
    ``keep_staging`` (async only) keeps the host copy's buffers between saves.
    """

    def __init__(self, output_dir: str | Path, rank: int, world: int, run_id: str | None, keep_last: int = 2,
                 async_save: bool = True, keep_staging: bool = True):
        self.root = checkpoint_root(output_dir)
        self.rank, self.world, self.run_id = rank, world, run_id
        self.keep_last, self.async_save = keep_last, async_save
        self.group = D.checkpoint_group()
        # None: the writer stages its own fresh copy, freed once written
        self._stager = D.staging_buffers(pinned=torch.cuda.is_available()) if keep_staging else None
        self._pending: tuple[Future, Path, Path] | None = None
        self._space = (0, 0)  # the pending save's (bytes needed, bytes free when it started)
        wait_all()  # a save in flight here would otherwise be removed below as stale
        if rank == 0 and self.root.is_dir():
            for stale in self.root.glob(".tmp_step_*"):  # a save this directory's last run did not finish
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, state: dict, trainer_state: dict, write_extra: Callable[[Path], None]) -> Path:
        """Start checkpoint ``step`` (every rank): ``state`` is this rank's DCP state dict,
        ``trainer_state`` rank 0's, ``write_extra(dir)`` rank 0's other files. Returns the path
        it will have once published."""
        self.wait()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier(self.group)
        self._space = (state_bytes(state), shutil.disk_usage(tmp).free)  # for a disk-full message
        try:
            _save(write_rng, rng_state(), rng_file(tmp, self.rank))  # tmp holds no older format's file
            if self.rank == 0:
                write_extra(tmp)
                _save(write_trainer_state, {**trainer_state, "step": step, "world": self.world,
                                            "run_id": self.run_id}, tmp / TRAINER)
            # every rank's own files are on disk before it joins DCP's collective plan, and rank 0's
            # write completes only after DCP gathered every rank's write results: rank 0 publishing
            # after its future is the barrier that makes the checkpoint visible only when complete
            future = D.save_shards(state, tmp / STATE, self.group, self.async_save, self._stager) or _done()
        except _FAILED as err:
            raise self._unwritable(final, err) from err
        self._pending = (future, tmp, final)
        _IN_FLIGHT.add(self)
        if not self.async_save:
            self.wait()
        return final

    def poll(self) -> None:
        """Publish the pending checkpoint if its write has finished (rank 0; never blocks)."""
        if self._pending is not None and self.rank == 0 and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the pending write is done; rank 0 then publishes it. Raises its error, if any."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        _IN_FLIGHT.discard(self)
        try:
            future.result()
        except _FAILED as err:
            raise self._unwritable(final, err) from err
        if self.rank == 0:
            self._publish(tmp, final)

    def _unwritable(self, final: Path, err: BaseException) -> CheckpointError:
        """The one-line error of a failed write; a full disk says so, with the space needed and free
        (torch.save reports a short write as ``unexpected pos``, DCP wraps each rank's error)."""
        needed, free = self._space
        if _disk_full(err) or shutil.disk_usage(self.root).free < needed:
            why = f"no space left on device (needs ~{_size(needed)}, {_size(free)} free)"
        else:
            why = _why(err)
        return CheckpointError(f"{final}: could not be written: {why}; the previous checkpoints are intact")

    def _publish(self, tmp: Path, final: Path) -> None:
        for f in tmp.rglob("*"):  # state/ was fsynced by DCP; the HF directories were not
            if f.is_file() and STATE not in f.relative_to(tmp).parts:
                _fsync(f)
        _fsync(tmp)
        if final.exists():  # the same step again (resumed from an earlier one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.root)
        log.info("checkpoint %s", final)
        self._prune(step_of(final))

    def _prune(self, step: int) -> None:
        if self.keep_last <= 0:
            return
        mine = [p for p in list_checkpoints(self.root.parent)
                if step_of(p) <= step and load_trainer_state(p).get("run_id") == self.run_id]
        for old in mine[:-self.keep_last]:
            trainer_file(old).unlink()  # first: a crash from here on leaves an incomplete, unlisted directory
            if not (old / HF_MODEL).is_dir():
                shutil.rmtree(old, ignore_errors=True)
                continue
            for part in old.iterdir():
                if part.is_dir() and part.name != HF_MODEL:
                    shutil.rmtree(part)
                elif part.is_file():
                    part.unlink()
