"""``python -m medix_fast.train``: GRPO / DAPO / GSPO / Dr. GRPO on MediX-style clinical QA.

    python -m medix_fast.train                                   # the tiny default, CPU, < 5 min
    python -m medix_fast.train --config configs/medix_r1_8b_dapo.yaml train.output_dir=runs/8b
    python -m medix_fast.train --config configs/tiny.yaml train.steps=10 optim.lr=3e-4 --strict false
    python -m medix_fast.train --config ... --resume              # continue from the latest checkpoint
    python -m medix_fast.train --config ... --resume-from runs/x/checkpoints/step_00000040
    torchrun --nproc_per_node=8 -m medix_fast.train --config ...  # multi-GPU (see distributed.py)

The command line: arguments parsed and the config loaded and checked before torch, transformers
or triton is imported, so ``--help``, a bad flag and a config error answer at once; the training
itself is ``medix_fast/trainer.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .. import preflight
from ..config import load_config
from ..errors import ArgumentParser, run_command

log = logging.getLogger("medix_fast.train")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def parse_args(argv: list[str] | None):
    p = ArgumentParser(prog="python -m medix_fast.train", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="overrides: section.key=value, e.g. train.steps=20 optim.lr=1e-5 "
                              "data.train_files=[a.jsonl,b.parquet]; flags may come anywhere on the line")
    p.add_argument("--config", help="YAML config (default: the packaged configs/tiny.yaml)")
    p.add_argument("--resume", action="store_const", const="latest", default=None,
                   help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT",
                   help="continue from this checkpoint directory (.../checkpoints/step_N)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a train.output_dir that holds a previous run, moved aside to <dir>.old-N")
    p.add_argument("--strict", type=_bool, default=None, metavar="{true,false}",
                   help="same as data.strict=...: false skips malformed rows instead of failing")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"data.strict={str(args.strict).lower()}"] if args.strict is not None else [])
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_config(args.config, overrides)  # a config error is answered here, before torch is imported
    preflight.check_train(cfg, args.resume)  # every path, before anything loads or is written
    from ..rl.loss_options import check_config

    check_config(cfg)  # the loss options through the kernels' own rules (imports torch)
    from .. import checkpoint as C, distributed as D
    from ..run_dir import claim_output_dir
    from ..runtime import setup_logging
    from ..trainer import Trainer, TrainingDiverged

    setup_logging(rank)
    trainer = None
    try:
        in_place = args.resume not in (None, "latest") and (  # --resume-from one of this run's own checkpoints
            Path(args.resume).resolve().parent == C.checkpoint_root(cfg.train.output_dir).resolve())
        aside = claim_output_dir(cfg.train.output_dir, args.resume == "latest" or in_place, args.overwrite, rank == 0)
        if aside:
            log.info("--overwrite: the previous run in %s was moved to %s", cfg.train.output_dir, aside)
        trainer = Trainer(cfg, args.resume)
        trainer.run()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: no traceback, one line
        latest = C.latest_checkpoint(cfg.train.output_dir)
        print("stopped at once (Ctrl-C), without writing a checkpoint: --resume will continue from "
              + (f"{latest} (step {C.step_of(latest)})" if latest else "scratch (no checkpoint yet)"), file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        D.close()
    return 128 + trainer.stop_requested if trainer and trainer.stop_requested else 0


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when done, 2 on a user error (one ``error:`` line), 1 when training diverged,
    128 + the signal when stopped by SIGINT (130) or SIGTERM (143), checkpoint written."""
    return run_command(_main, argv)
