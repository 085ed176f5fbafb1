"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) in one fused pass.

Rewards arrive flat, (N,), in contiguous groups of ``group_size`` responses to one prompt.
One Triton program normalises a block of groups in registers: group mean, unbiased std
(both shifted by the group's first reward, so a constant group gives exactly 0), advantage, and the per-group statistics a DAPO-style filter needs (drop groups whose std is 0).

    adv, stats = group_advantages(rewards, group_size=5, return_stats=True)
    keep = stats.std > 0                                   # (N // group_size,)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import cpp
from .dispatch import backend_for

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
_ESTIMATOR_ID = {name: i for i, name in enumerate(ESTIMATORS)}


class GroupStats(NamedTuple):
    mean: torch.Tensor  # (N // group_size,) float32
    std: torch.Tensor  # (N // group_size,) float32, unbiased


@triton.jit
def _group_advantage_kernel(
    rewards_ptr, adv_ptr, mean_ptr, std_ptr, num_groups, group_size, eps,
    ESTIMATOR: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
    cols = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    inside = (rows[:, None] < num_groups) & (cols[None, :] < group_size)
    offsets = rows[:, None] * group_size + cols[None, :]
    r = tl.load(rewards_ptr + offsets, mask=inside, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_S)
    first = tl.sum(tl.where(cols[None, :] == 0, r, 0.0), axis=1)  # (BLOCK_G,) shift: exact 0 for constant groups
    shifted = tl.where(inside, r - first[:, None], 0.0)
    mean_shifted = tl.sum(shifted, axis=1) / group_size  # (BLOCK_G,)
    mean = first + mean_shifted
    centred = tl.where(inside, shifted - mean_shifted[:, None], 0.0)
    std = tl.sqrt(tl.sum(centred * centred, axis=1) / (group_size - 1))  # (BLOCK_G,)
    if ESTIMATOR == 0:
        adv = centred / (std[:, None] + eps)
    elif ESTIMATOR == 1:
        adv = centred
    else:
        adv = centred * (group_size / (group_size - 1.0))
    tl.store(adv_ptr + offsets, adv, mask=inside)
    tl.store(mean_ptr + rows, mean, mask=rows < num_groups)
    tl.store(std_ptr + rows, std, mask=rows < num_groups)


def tiles(num_groups: int, group_size: int) -> tuple[int, int, int]:
    """(groups, responses, warps) per program: a block of at most 2048 rewards, 8 warps above 1024
    (4 spill registers there: python -m medix_fast.kernels --compile-check)."""
    block_s = triton.next_power_of_2(group_size)
    block_g = max(1, min(triton.next_power_of_2(num_groups), 2048 // block_s))
    return block_g, block_s, 8 if block_g * block_s > 1024 else 4


def _launch(rewards: torch.Tensor, group_size: int, estimator: str, eps: float):
    num_groups = rewards.numel() // group_size
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)  # (N,)
    mean = torch.empty(num_groups, dtype=torch.float32, device=rewards.device)  # (G,)
    std = torch.empty_like(mean)  # (G,)
    block_g, block_s, num_warps = tiles(num_groups, group_size)
    grid = (triton.cdiv(num_groups, block_g),)
    _group_advantage_kernel[grid](
        rewards, adv, mean, std, num_groups, group_size, eps,
        ESTIMATOR=_ESTIMATOR_ID[estimator], BLOCK_G=block_g, BLOCK_S=block_s, num_warps=num_warps,
    )
    return adv, GroupStats(mean, std)


def _torch_group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, eps: float):
    r = rewards.float().view(-1, group_size)  # (G, S)
    shifted = r - r[:, :1]  # shift by the first reward: constant groups centre to exactly 0
    mean_shifted = shifted.mean(dim=1)  # (G,)
    mean = r[:, 0] + mean_shifted
    centred = shifted - mean_shifted[:, None]  # (G, S)
    std = torch.sqrt(centred.square().sum(1) / (group_size - 1))  # (G,) unbiased
    if estimator == "grpo":
        adv = centred / (std[:, None] + eps)
    elif estimator == "dr_grpo":
        adv = centred
    else:
        adv = centred * (group_size / (group_size - 1.0))
    return adv.reshape(-1), GroupStats(mean, std)


def _check(rewards: torch.Tensor, group_size: int, estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor (N,), got {shape}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the number of rewards N={rewards.numel()} (N > 0)"
        )


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    return_stats: bool = False,
):
    """Advantages of ``rewards`` (N,) relative to their group of ``group_size`` responses.

    Estimators (``s`` is the unbiased group std, ``G`` the group size):
      ``grpo``    (r - mean) / (s + eps)           -- EasyR1 / MediX-R1
      ``dr_grpo`` r - mean                          -- Dr. GRPO, no std scaling
      ``rloo``    r - mean of the other G-1 rewards = G/(G-1) * (r - mean)

    Returns the advantages, (N,) float32, and with ``return_stats=True`` also a
    :class:`GroupStats` of per-group ``mean`` and ``std`` (N // group_size,) so a caller can
    drop groups with no signal (DAPO dynamic sampling). No gradient flows to ``rewards``.
    """
    _check(rewards, group_size, estimator)
    rewards = rewards.detach().contiguous()
    path = backend_for("group_advantages", rewards)
    if path == "cpp":
        adv, mean, std = cpp.group_advantages(rewards, group_size, _ESTIMATOR_ID[estimator], float(eps))
        stats = GroupStats(mean, std)
    elif path == "triton":
        adv, stats = _launch(rewards, group_size, estimator, float(eps))
    else:
        adv, stats = _torch_group_advantages(rewards, group_size, estimator, float(eps))
    return (adv, stats) if return_stats else adv
