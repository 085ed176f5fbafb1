"""Trainer-sampler mismatch: how far the sampler's log-probs are from the trainer's, every step.

The sampler draws each token from the live weights and records ``log pi_s(token)``; the update's
old log-probs are ``log pi_t(token)`` of the same weights through the training forward. They
differ only by numerics (kernels, cast and reduction order). :class:`Mismatch` accumulates, on
the device, per prompt kind (text / image rows) the sums from which the step's figures follow:

- ``mismatch/abs_mean``, ``mismatch/abs_max``: mean and max ``|log pi_t - log pi_s|`` over tokens;
- ``mismatch/k3_kl``: k3 estimate of KL(pi_s || pi_t) on the sampled tokens,
  ``r - 1 - log r`` with ``r = pi_t / pi_s``;
- ``mismatch/pearson``: Pearson correlation of the two probabilities of the tokens;
- ``mismatch/frac_above_1e-3``: fraction of tokens with ``|delta| > 1e-3``;

and, when the step has both kinds, the same under ``mismatch/text/`` and ``mismatch/image/``.
:meth:`Mismatch.scalars` hands the sums to the step's one metric reduction (no host read of its
own; the maxima are all-reduced on the device first), :meth:`Mismatch.finish` turns the reduced
numbers into the figures.
"""
from __future__ import annotations

import math

import torch

from .. import distributed as D

KINDS = ("text", "image")
SUMS = ("n", "abs", "k3", "above", "p", "q", "pp", "qq", "pq")  # per kind; "max" beside them
THRESHOLD = 1e-3


class Mismatch:
    """Device sums of one step's sampler-vs-trainer comparison, per prompt kind."""

    def __init__(self, device: torch.device):
        self.device = device  # the training device, as given (collectives get it, not a tensor's)
        self.sums = torch.zeros(len(KINDS), len(SUMS), dtype=torch.float64, device=device)  # (2, 9)
        self.max = torch.zeros(len(KINDS), dtype=torch.float64, device=device)  # (2,)

    @torch.no_grad()
    def add(self, sampler: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> None:
        """One micro-batch: (B, C) sampler and trainer log-probs, (B, C) token mask, (B,) 1 on image rows."""
        s, t, m = sampler.double(), trainer.double(), mask.double()  # (B, C)
        delta = (t - s) * m
        p, q = s.exp() * m, t.exp() * m
        per_token = torch.stack([m, delta.abs(), (delta.exp() - 1 - delta) * m, (delta.abs() > THRESHOLD) * m,
                                 p, q, p * p, q * q, p * q], -1)  # (B, C, 9)
        per_row = per_token.sum(1)  # (B, 9)
        kind = torch.stack([1 - image.double(), image.double()], 0)  # (2, B)
        self.sums += kind @ per_row
        self.max = torch.maximum(self.max, (kind * delta.abs().amax(1)).amax(1))

    def scalars(self, world: int) -> dict[str, torch.Tensor]:
        """The sums as named 0-dim device tensors for a ``sum`` reduction over ``world`` ranks (the
        maxima all-reduced with ``max`` on the device, then divided by ``world``)."""
        top = D.all_reduce(self.max.clone(), self.device, "max") / world
        out = {f"mismatch:{k}:{s}": self.sums[i, j] for i, k in enumerate(KINDS) for j, s in enumerate(SUMS)}
        out.update({f"mismatch:{k}:max": top[i] for i, k in enumerate(KINDS)})
        return out

    @staticmethod
    def finish(stats: dict[str, float]) -> dict[str, float]:
        """The step's ``mismatch/*`` figures from the reduced :meth:`scalars` (none without tokens)."""
        kinds = {k: {s: stats[f"mismatch:{k}:{s}"] for s in (*SUMS, "max")} for k in KINDS}
        total = {s: sum(kinds[k][s] for k in KINDS) for s in SUMS}
        total["max"] = max(kinds[k]["max"] for k in KINDS)
        out = _figures("mismatch/", total)
        if all(kinds[k]["n"] > 0 for k in KINDS):
            for k in KINDS:
                out.update(_figures(f"mismatch/{k}/", kinds[k]))
        return out


def _figures(prefix: str, v: dict[str, float]) -> dict[str, float]:
    n = v["n"]
    if n <= 0:
        return {}
    cov = v["pq"] / n - v["p"] * v["q"] / n ** 2
    var = (v["pp"] / n - (v["p"] / n) ** 2) * (v["qq"] / n - (v["q"] / n) ** 2)
    return {f"{prefix}abs_mean": v["abs"] / n, f"{prefix}abs_max": v["max"], f"{prefix}k3_kl": v["k3"] / n,
            f"{prefix}pearson": cov / math.sqrt(var) if var > 0 else math.nan,
            f"{prefix}frac_above_1e-3": v["above"] / n}
