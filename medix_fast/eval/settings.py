"""The evaluation's generation and grading settings (``EvalSettings``), apart from the evaluator so
that the command line reads its defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32  # items per rank per sampler call (and per write)
    seed: int = 0
    judge_votes: int = 1
    judge_temperature: float = 0.0  # > 0 with judge_votes > 1: a sampled majority vote
