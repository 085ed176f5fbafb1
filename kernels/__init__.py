"""medix_fast.kernels: fused kernels for group-based RL, importable with torch + triton alone.

    from medix_fast.kernels import (group_advantages, fused_linear_logprobs,
                                    policy_loss, fused_linear_policy_loss)

CUDA tensors take the Triton kernels, CPU tensors the chunked PyTorch path; force either with
``MEDIX_FAST_BACKEND=triton|torch`` or :func:`set_backend`. ``python -m medix_fast.kernels``
prints which back-ends are active here.
"""
from .advantage import GroupStats, group_advantages
from .dispatch import active_backends, force_backend, set_backend
from .fused_policy_loss import fused_linear_policy_loss
from .logprobs import fused_linear_logprobs
from .policy_loss import LOSS_TYPES, LEVELS, LossOptions, policy_loss

__all__ = [
    "LEVELS",
    "LOSS_TYPES",
    "GroupStats",
    "LossOptions",
    "fused_linear_policy_loss",
    "policy_loss",
    "active_backends",
    "force_backend",
    "fused_linear_logprobs",
    "group_advantages",
    "set_backend",
]
