"""Masked importance sampling (MIS): which sequences to keep, from trainer vs sampler log-probs.

    keep = mis_keep(old, sampling, mask, cap=2.0, level="sequence")   # (B,) 1.0 kept, 0.0 dropped
    advantages = advantages * keep                                     # no policy gradient from the rest

A sequence sampled by ``pi_s`` and trained with ``pi_t`` (the old log-probs of the same weights)
has the importance ratio ``r = prod_t pi_t / pi_s`` (``level="sequence"``) or its geometric mean
``exp(mean_t log pi_t / pi_s)`` (``level="geometric"``, length-independent). MIS drops the whole
sequence when ``r`` leaves ``[1 / cap, cap]`` instead of reweighting it (token-level ``tis_cap``
truncates per token). Computed in log space, fp32 or wider, on the device: no host sync. Rows
with no valid token are kept (they carry no loss).
"""
from __future__ import annotations

import math

import torch

MIS_LEVELS = ("sequence", "geometric")


def mis_log_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """(B,) log of each row's trainer / sampler ratio over its valid tokens; (B, C) inputs."""
    if level not in MIS_LEVELS:
        raise ValueError(f"level must be one of {MIS_LEVELS}, got {level!r}")
    dtype = torch.promote_types(old.dtype, torch.float32)
    m = mask.to(dtype)
    log_ratio = ((old.to(dtype) - sampling.to(dtype)) * m).sum(1)  # (B,)
    if level == "geometric":
        log_ratio = log_ratio / m.sum(1).clamp_min(1)
    return log_ratio


def mis_keep(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, cap: float,
             level: str = "sequence") -> torch.Tensor:
    """(B,) 1 where the row's ratio lies in ``[1 / cap, cap]``, else 0, in ``mask``'s dtype."""
    if not cap > 1:
        raise ValueError(f"cap must be > 1, got {cap}")
    return (mis_log_ratio(old, sampling, mask, level).abs() <= math.log(cap)).to(mask.dtype)
