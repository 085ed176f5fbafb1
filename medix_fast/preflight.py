"""What a command checks before it does any work: every path it was given, one line each.

    preflight.output_dir(cfg.train.output_dir, "train.output_dir")   # creatable and writable
    preflight.input_file(args.config, "--config")                    # present, a file, readable
    preflight.model_dir(args.model, "--model")                       # a Hugging Face checkpoint

Each check raises a :class:`UserError` naming the option and the path (``run_command`` prints
it as one ``error:`` line, exit status 2), so a wrong path is refused before a model loads or a
file is written, not minutes later or as a traceback. The checks only look: nothing is created
or removed. Standard library only, so a command can run them right after parsing its line.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def _present(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    return p


def _readable(p: Path, what: str) -> None:
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UserError(f"{what} {str(p)!r} cannot be read (permission denied)")


def _input(path: str | os.PathLike, what: str, kind: str) -> Path:
    """``path`` if it is a readable ``kind`` ("file" or "directory"; ``what``: the option or key that gave it)."""
    p = _present(path, what)
    if not (p.is_file() if kind == "file" else p.is_dir()):
        raise UserError(f"{what} {str(path)!r} is a {'directory' if kind == 'file' else 'file'}, not a {kind}")
    _readable(p, what)
    return p


def input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a readable file (``what``: the option or key that gave it)."""
    return _input(path, what, "file")


def input_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a readable directory."""
    return _input(path, what, "directory")


def input_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a readable file or directory (data: a file, or a dataset / a folder of files)."""
    p = _present(path, what)
    _readable(p, what)
    return p


def data_files(names: Iterable[str], what: str) -> None:
    """Each data file present (``sample:<split>``, the bundled set, is checked by the loader)."""
    for i, name in enumerate(names):
        if not str(name).startswith("sample:"):
            input_path(name, f"{what}[{i}]")


def model_dir(path: str | os.PathLike, what: str | None) -> None:
    """``path`` is a Hugging Face checkpoint directory (with ``config.json``) or a tiny model's
    name; a training checkpoint is told apart, with what to give instead. ``what`` (the option)
    prefixes the message when given."""
    prefix, p = f"{what}: " if what else "", Path(path).expanduser()
    if not p.is_dir():
        from .demo.cache import TINY_NAMES

        if str(path) in TINY_NAMES:
            return
        raise UserError(f"{prefix}model path {str(path)!r} does not exist or is not a directory "
                        "(give a local Hugging Face checkpoint directory, or 'tiny')")
    _readable(p, f"{prefix}model path")
    if (p / "config.json").is_file():
        return
    from .checkpoint import HF_CONFIG, HF_MODEL

    if (p / HF_CONFIG).is_dir():
        if (p / HF_MODEL / "config.json").is_file():
            raise UserError(f"{prefix}model path {str(path)!r} is a training checkpoint: give its Hugging Face "
                            f"model, {p / HF_MODEL}")
        raise UserError(f"{prefix}model path {str(path)!r} is a training checkpoint without a Hugging Face model "
                        f"({HF_MODEL}/): write one with python -m medix_fast.export --checkpoint {p} --out DIR, "
                        "and give DIR")
    raise UserError(f"{prefix}model path {str(p)!r} has no config.json: not a Hugging Face checkpoint")


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` is a directory, or can be made one, and this process may write in it: its nearest
    existing ancestor is a directory and accepts a file (probed with an unnamed temporary file,
    which leaves nothing behind: permissions, read-only mounts and quotas all answer)."""
    p = Path(path).expanduser()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == p else f": {str(existing)!r} is a file"
        raise UserError(f"{what} {str(path)!r} is not a directory{where}")
    if existing == p:
        _readable(p, what)  # what it holds is looked at (an earlier run, results to continue)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{what} {str(path)!r} cannot be written: {err.strerror} in {str(existing)!r}") from None
    return p


# ----------------------------------------------------------------------------- per command
def check_eval(args) -> None:
    """``python -m medix_fast.eval``'s paths (``args.out`` already given its default) and the
    protocol's needs: MediX-R1's judge phase needs ``--judge``, known before generating."""
    model_dir(args.model, "--model")
    if args.protocol == "medix_r1" and args.phase in ("all", "judge") and not args.judge:
        raise UserError("--protocol medix_r1: the judge phase needs --judge JUDGE_DIR (a local causal LM, Qwen3-14B "
                        "in the reference; or --phase generate to generate only)")
    if args.judge:
        model_dir(args.judge, "--judge")
    if args.semantic_model:
        input_dir(args.semantic_model, "--semantic-model")
    if args.data and not args.data.startswith("sample:"):
        input_path(args.data, "--data")
    if args.tasks:
        input_file(args.tasks, "--tasks")
    if args.data_dir:
        input_dir(args.data_dir, "--data-dir")
    output_dir(args.out, "--out")


def check_train(cfg, resume: str | None) -> None:
    """``python -m medix_fast.train``'s paths: the output directory, the model (and a PEFT adapter), the data, the
    evaluation tasks, the reward models in use and ``--resume-from``'s checkpoint."""
    output_dir(cfg.train.output_dir, "train.output_dir")
    if resume not in (None, "latest"):
        input_dir(resume, "--resume-from")
    model_dir(cfg.model.path, None)
    if cfg.model.lora.init_from:
        input_dir(cfg.model.lora.init_from, "model.lora.init_from")
    data_files(cfg.data.train_files, "data.train_files")
    data_files(cfg.data.val_files, "data.val_files")
    if cfg.eval.tasks:
        input_file(cfg.eval.tasks, "eval.tasks")
    if cfg.eval.judge_model:
        model_dir(cfg.eval.judge_model, "eval.judge_model")
    if cfg.eval.data_dir:
        input_dir(cfg.eval.data_dir, "eval.data_dir")
    r = cfg.rewards
    for key, component in (("judge_model", "accuracy"), ("semantic_model", "semantic")):
        if getattr(r, key) and r.active(component):
            input_dir(getattr(r, key), f"rewards.{key}")


def check_export(args) -> None:
    """``python -m medix_fast.export``'s checkpoint and output directory."""
    input_dir(args.checkpoint, "--checkpoint")
    out = Path(args.out)
    output_dir(out.parent if out.is_file() else out, "--out")  # a file: export's own to refuse or move aside


def check_plan(args) -> None:
    """``python -m medix_fast.generate --plan``'s config file and model config (a path or a known name)."""
    if args.config is not None:
        input_file(args.config, "--config")
    if args.model_config and Path(args.model_config).expanduser().exists():
        input_path(args.model_config, "--model-config")
