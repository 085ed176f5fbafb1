"""The one place that decides which implementation a kernel call runs.

Back-ends:
  ``triton`` -- the Triton kernels (CUDA tensors; on the CPU only under ``TRITON_INTERPRET=1``).
  ``torch``  -- the chunked pure-PyTorch implementations, the CPU path and the reference.
  ``cpp``    -- the C++ CPU ops of ``csrc/`` (``kernels/cpp.py``, built at first use) where a
                kernel has one (policy_loss, group_advantages); the ``torch`` path elsewhere.

``auto`` (the default) takes ``triton`` for CUDA tensors when triton imports; for CPU tensors
``cpp`` when the extension builds and loads, else ``torch`` (also inside ``torch.compile``, which
fuses the PyTorch path itself and must not trace the extension's build).
Force a back-end with the environment variable ``MEDIX_FAST_BACKEND=triton|torch|cpp|auto`` or,
from code and tests, with :func:`set_backend` / the :func:`force_backend` context manager.

``MEDIX_FAST_DEBUG=1`` turns on the checks of tensor *values* (target ids in range, hinted
lengths against the mask): they read device memory on the host, a sync the hot path never makes.
Shapes, dtypes and options are always checked.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import cpp
from .loss_specs import LOSS_SPECS

BACKENDS = ("auto", "triton", "torch", "cpp")
# The public ops and their non-PyTorch implementations, in the order they are preferred.
OPS = {
    "group_advantages": ("cpp", "triton"),
    "policy_loss": ("cpp",),
    "fused_linear_logprobs": ("triton",),
    "fused_linear_policy_loss": ("triton",),
}
# Loss options (LossOptions.features()) a back-end does not implement: a call using one runs on
# the next back-end of OPS, else PyTorch, which has them all. The C++ op lacks the loss types
# without a C++ id (kernels/loss_specs.py).
LACKS = {
    ("policy_loss", "cpp"): frozenset({name for name, spec in LOSS_SPECS.items() if spec.cpp_id is None}
                                      | {"entropy_token_mean", "top_entropy_quantile", "off_policy_mask_threshold"}),
}
_forced: str | None = None


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _has_triton()


def set_backend(name: str | None) -> None:
    """Force ``"triton"``, ``"torch"`` or ``"cpp"`` for every later call; ``None`` or ``"auto"`` restores the default."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "cpp":
        cpp.available()  # build now, not inside a torch.compile trace
    _forced = None if name in (None, "auto") else name


@contextlib.contextmanager
def force_backend(name: str):
    """Context manager form of :func:`set_backend`."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def requested_backend() -> str:
    """The back-end asked for: the forced one, else ``MEDIX_FAST_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    name = os.environ.get("MEDIX_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MEDIX_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a kernel called on ``tensor`` takes the Triton path."""
    name = requested_backend()
    if name in ("torch", "cpp"):
        return False
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("MEDIX_FAST_BACKEND=triton but triton is not importable")
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "the triton back-end on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return HAS_TRITON and tensor.device.type == "cuda"


def use_cpp(tensor: torch.Tensor) -> bool:
    """Whether a kernel with a C++ op (policy_loss, group_advantages: CPU ops), called on ``tensor``,
    takes it."""
    name = requested_backend()
    if name == "cpp":
        if tensor.device.type != "cpu":
            raise RuntimeError(f"MEDIX_FAST_BACKEND=cpp: the C++ ops run on the CPU only, got a {tensor.device} "
                               "tensor (CUDA tensors take the Triton kernels)")
        if not cpp.available():
            raise RuntimeError(f"MEDIX_FAST_BACKEND=cpp but the C++ ops are unavailable ({cpp.unavailable_reason()})")
        return True
    return name == "auto" and tensor.device.type == "cpu" and not torch.compiler.is_compiling() and cpp.available()


def backend_for(op: str, tensor: torch.Tensor, features: frozenset[str] = frozenset()) -> str:
    """The implementation ``op`` (a key of :data:`OPS`) runs on ``tensor``'s device: ``cpp``,
    ``triton`` or ``torch``, skipping one that :data:`LACKS` a used option (``features``). What each
    public op branches on, and what ``python -m medix_fast.doctor`` reports."""
    for name in OPS[op]:
        if features & LACKS.get((op, name), frozenset()):
            continue
        if (use_cpp if name == "cpp" else use_triton)(tensor):
            return name
    return "torch"


def debug_checks() -> bool:
    """Whether the value checks that cost a host-device sync run (``MEDIX_FAST_DEBUG=1``)."""
    return os.environ.get("MEDIX_FAST_DEBUG", "0").strip() not in ("", "0")


def active_backends() -> dict[str, bool]:
    """Which back-ends can run here (reported by ``python -m medix_fast.kernels``)."""
    return {
        "torch": True,
        "triton": HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
        "cpp": cpp.available(),  # builds the extension on first call
        "cuda": torch.cuda.is_available(),
    }
