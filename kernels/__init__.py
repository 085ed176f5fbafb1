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
    # This folder was found as a top-level ``kernels`` (a checkout's root on sys.path: ``python -m``,
    # pytest, a notebook there). That name belongs to the PyPI package ``kernels``, which transformers
    # imports at start-up: load the real one from the rest of sys.path, or fail as if this folder were
    # not there. Never serve medix_fast's kernels under that name (see the README's layout section).
    import importlib.machinery
    import importlib.util
    import os

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r} ({_here}/kernels is medix_fast.kernels, "
                                  "not the PyPI package 'kernels')", name=__name__)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real  # the import statement returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_real)
else:
    from .advantage import GroupStats, group_advantages
    from .dispatch import active_backends, force_backend, set_backend
    from .fused_policy_loss import fused_linear_policy_loss
    from .logprobs import fused_linear_logprobs
    from .loss_specs import LOSS_SPECS, LOSS_TYPES, LossSpec
    from .policy_loss import LEVELS, LossOptions, policy_loss

__all__ = [
    "LEVELS",
    "LOSS_SPECS",
    "LOSS_TYPES",
    "GroupStats",
    "LossOptions",
    "LossSpec",
    "active_backends",
    "force_backend",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "group_advantages",
    "policy_loss",
    "set_backend",
]
