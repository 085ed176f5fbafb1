"""Evaluation of a checkpoint on medical QA tasks (``python -m medix_fast.eval``, ``cli.py``), graded
like MediX-R1: ``evaluator.py`` runs the items, ``tasks.py`` loads them, ``scoring.py`` grades the
answers, ``results.py`` writes and resumes the results. Training runs the same ``Evaluator``.
``--protocol medix_r1`` runs MediX-R1's published evaluation instead: ``medix_r1.py`` (phases),
``medix_r1_tasks.py`` (its 17 benchmarks), ``medix_r1_judge.py`` (its three-round judge);
training runs it with ``medix_r1_training.R1Evaluator`` (``eval.protocol: medix_r1``).
``shares.py``: how both split items across ranks and append what they made.
The evaluator's names are imported when first asked for (torch comes with them), so that
``python -m medix_fast.eval --help`` answers at once."""
from .cli import main
from .settings import EvalSettings

EVALUATOR_NAMES = ("Evaluator", "Generation", "sampler_generate")


def __getattr__(name: str):
    if name in EVALUATOR_NAMES:
        from . import evaluator

        return getattr(evaluator, name)
    if name == "R1Evaluator":
        from .medix_r1_training import R1Evaluator

        return R1Evaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalSettings", "R1Evaluator", "main", *EVALUATOR_NAMES]
