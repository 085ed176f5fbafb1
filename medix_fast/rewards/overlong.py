"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), an optional reward component.

With maximum length L and buffer C, a response of |y| tokens gets 0 while |y| <= L - C, then
((L - C) - |y|) / C, falling linearly to -1 at L, and -1 past L. The penalty factor is the
component's weight in ``RewardConfig.weights`` (MediX-R1 does not use this component).
"""
from __future__ import annotations

import torch

from medix_fast.errors import ConfigError


def overlong_penalty(lengths, max_length: int, buffer: int) -> torch.Tensor:
    """lengths (N,) token counts -> (N,) float32 in [-1, 0]."""
    if not 0 < buffer <= max_length:
        raise ConfigError(f"overlong shaping needs 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}")
    n = torch.as_tensor(lengths, dtype=torch.float32).reshape(-1).cpu()  # (N,)
    return (((max_length - buffer) - n) / buffer).clamp(-1.0, 0.0)
