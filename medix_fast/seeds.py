"""Seeds derived from the run's seed: one mixing rule for every consumer (data order, rollout,
evaluation), so a resumed run draws exactly what the uninterrupted one would.

    from medix_fast.seeds import mix_seed
    mix_seed(cfg.train.seed, step, attempt, rank)   # an int in [0, 2**31 - 1)
"""
from __future__ import annotations

MODULUS = 2**31 - 1  # every torch / numpy generator takes it


def mix_seed(seed: int, *parts: int) -> int:
    """``seed`` folded with ``parts`` in order (h = h * 1_000_003 + part, modulo 2**31 - 1):
    different parts give different seeds, the same parts the same seed on every machine."""
    h = seed % MODULUS
    for part in parts:
        h = (h * 1_000_003 + part) % MODULUS
    return h
