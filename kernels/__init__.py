"""medix_fast.kernels: fused kernels for group-based RL, importable with torch + triton alone.

    from medix_fast.kernels import (group_advantages, fused_linear_logprobs,
                                    policy_loss, fused_linear_policy_loss)

CUDA tensors take the Triton kernels; CPU tensors the C++ ops of ``csrc/`` where they build
(policy_loss, group_advantages) and the chunked PyTorch path elsewhere. Force one with
``MEDIX_FAST_BACKEND=triton|cpp|torch`` or :func:`set_backend`. ``python -m medix_fast.kernels``
builds the C++ ops and prints which back-ends are active here.
"""
import sys

if __name__ == "kernels":
    # Imported as top-level ``kernels`` (a checkout on sys.path, probed by transformers): be the installed package.
    import importlib

    sys.modules[__name__] = importlib.import_module("medix_fast.kernels")
else:
    from .advantage import GroupStats, group_advantages
    from .dispatch import active_backends, force_backend, set_backend
    from .fused_policy_loss import fused_linear_policy_loss
    from .logprobs import fused_linear_logprobs
    from .policy_loss import LEVELS, LOSS_TYPES, LossOptions, policy_loss

__all__ = [
    "LEVELS",
    "LOSS_TYPES",
    "GroupStats",
    "LossOptions",
    "active_backends",
    "force_backend",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "group_advantages",
    "policy_loss",
    "set_backend",
]
