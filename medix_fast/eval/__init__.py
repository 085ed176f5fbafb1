"""Evaluation of a checkpoint on medical QA tasks (``python -m medix_fast.eval``, ``cli.py``), graded
like MediX-R1: ``evaluator.py`` runs the items, ``tasks.py`` loads them, ``scoring.py`` grades the
answers, ``results.py`` writes and resumes the results. Training runs the same ``Evaluator``.
``--protocol medix_r1`` runs MediX-R1's published evaluation instead: ``medix_r1.py`` (phases),
``medix_r1_tasks.py`` (its 17 benchmarks), ``medix_r1_judge.py`` (its three-round judge)."""
from .cli import main
from .evaluator import EvalSettings, Evaluator, Generation, sampler_generate

__all__ = ["EvalSettings", "Evaluator", "Generation", "main", "sampler_generate"]
