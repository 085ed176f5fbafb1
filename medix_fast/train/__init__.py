"""``python -m medix_fast.train``: the command line (``cli.py``, light: torch is imported after the
arguments and the config are read) over the trainer (``medix_fast/trainer.py``), whose names are
served from here too (``from medix_fast.train import Trainer``), imported when first asked for."""
from .cli import main, parse_args

TRAINER_NAMES = ("Trainer", "TrainingDiverged", "lr_lambda", "peak_memory_gib")


def __getattr__(name: str):
    if name in TRAINER_NAMES:
        from .. import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main", "parse_args", *TRAINER_NAMES]
