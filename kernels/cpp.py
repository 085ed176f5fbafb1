"""Python side of the C++ ops in ``csrc/`` (``torch.ops.medix_fast.*``): build, load, autograd.

The extension is compiled just in time, once, at first use (``torch.utils.cpp_extension.load``
with ninja and the system C++ compiler; about a minute on 2 cores), and cached under
``~/.cache/torch_extensions`` (or ``$TORCH_EXTENSIONS_DIR``) under a name that carries a digest of
what makes the binary (sources, torch build and ABI, Python, compiler, flags), so another checkout,
branch or virtualenv is another build, never a rebuild over this one; a first build is announced on the ``medix_fast.kernels`` logger ("building
the C++ ops, once"). CPU only: on CUDA the Triton kernels and PyTorch run, so no nvcc build is
ever paid for. Any failure (no compiler, no ninja) warns once and leaves :func:`available` False, so the dispatch falls back to the PyTorch
path. Prebuild, and see what is active, with::

    python -m medix_fast.kernels

Ops (schemas in ``csrc/ops.cpp``): ``policy_loss`` (forward and backward in one pass; autograd
is registered here as grad_output * the saved gradient, so it is differentiable once, not
twice), ``group_advantages`` and ``paged_decode`` (the rollout engine's decode attention,
``medix_fast.generate.attention``), ``sample_tokens`` (the engine's sampling step at large
vocabularies) and ``exact_attention`` (``sampling.exact``'s attention, ``kernels/exact.py``), CPU only (the default there: faster than the PyTorch path; on CUDA tensors the
Triton kernels and PyTorch run). Each has a
fake implementation, so they work under ``torch.compile``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .loss_specs import LOSS_SPECS

# csrc/ beside kernels/ in a checkout; medix_fast/csrc beside medix_fast/kernels when installed.
CSRC = Path(__file__).resolve().parent.parent / "csrc"
METRICS = ("ratio_mean", "clip_low", "clip_high", "clip_dual", "kl", "entropy")
# the policy_loss op's arguments after its tensors and ids, LossOptions fields by name (set at load
# from the op's schema, csrc/ops.cpp: never a second list of them here)
_OPTIONS: tuple[str, ...] = ()
_error: str | None = None
_available: bool | None = None  # None: not tried yet
log = logging.getLogger("medix_fast.kernels")


def build_root() -> Path:
    """Where torch caches JIT-built extensions (``$TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def is_built(name: str) -> bool:
    """Whether a library of extension ``name`` is in the cache (it may still be rebuilt if stale)."""
    root = build_root()
    return root.is_dir() and any(re.fullmatch(rf"{name}(_v\d+)?\.so", p.name) for p in root.rglob(f"{name}*.so"))


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _compiler() -> str:
    """The C++ compiler torch will call and its version line ('' when it cannot be run)."""
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{cxx} {(out.splitlines() or [''])[0]}"


def extension_name() -> str:
    """The extension's name, a digest of everything that makes the binary: the sources, the torch
    build (version and install location) and C++ ABI it links against, the Python, the compiler and the flags. Two checkouts,
    branches or virtualenvs on one machine each keep their own build, never rebuilding over another's."""
    digest = hashlib.sha256()
    for path in sorted([*_sources(), *CSRC.glob("*.h")]):
        digest.update(path.read_bytes())
    # torch's install location too: its include paths are build arguments, so a second virtualenv with
    # the same torch would otherwise bump and rebuild the shared name at every switch
    digest.update(repr((torch.__version__, os.path.dirname(torch.__file__), torch.compiled_with_cxx11_abi(),
                        sys.implementation.cache_tag, _compiler(), CFLAGS, LDFLAGS)).encode())
    return "medix_fast_C_" + digest.hexdigest()[:10]


STALE_LOCK_S = 1200  # a build takes about a minute; a lock this old was left by a killed one


def _clear_stale_lock(name: str) -> None:
    """torch waits forever on the build directory's ``lock`` while it exists; a build killed
    mid-way (Ctrl-C, a timeout) leaves it behind. Remove one older than :data:`STALE_LOCK_S`."""
    from torch.utils import cpp_extension

    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f min ago by an interrupted build of the C++ ops", lock, age / 60)
        lock.unlink(missing_ok=True)


def _build() -> None:
    from torch.utils import cpp_extension

    sources, name = _sources(), extension_name()
    _clear_stale_lock(name)
    announced = not is_built(name)
    if announced:
        log.info("building the C++ ops of %s, once (about a minute; cached in %s)", CSRC, build_root())
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        is_python_module=False,
        verbose=os.environ.get("MEDIX_FAST_BUILD_VERBOSE") == "1",
    )
    seconds = time.perf_counter() - start
    if announced or seconds > 10:
        log.info("%s the C++ ops in %.0f s%s", "built" if announced else "rebuilt", seconds,
                 "" if announced else " (their sources or flags changed)")


def available() -> bool:
    """Whether the ops are loaded, building them first if needed (once per process). Once answered
    it is a global read, which ``torch.compile`` traces as a constant."""
    global _available
    if _available is None:
        _available = _load()
    return _available


def _load() -> bool:
    global _error
    if not any(CSRC.glob("*.cpp")):
        _error = f"no C++ sources in {CSRC}"
    else:
        try:
            _build()
        except Exception as exc:  # no compiler, no ninja, a compile error
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            _error = f"{type(exc).__name__}: {first_line}"
        else:
            _register_python_parts()
            return True
    warnings.warn(f"medix_fast C++ ops unavailable, using the PyTorch path ({_error}; "
                  "MEDIX_FAST_BUILD_VERBOSE=1 shows the build)", stacklevel=2)
    return False


def supports(device: torch.device) -> bool:
    """Whether the ops run on ``device``: the CPU, once loaded."""
    return device.type == "cpu" and available()


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None if nothing failed)."""
    return _error


def _register_python_parts() -> None:
    global _OPTIONS
    lib = "medix_fast::"
    names = [a.name for a in torch.ops.medix_fast.policy_loss.default._schema.arguments]
    _OPTIONS = tuple(names[names.index("level") + 1:])

    @torch.library.register_fake(lib + "policy_loss")
    def _policy_loss_fake(logp, old, adv, mask, ref, entropy, sampling, num_items, loss_type, level, epsilon_low,
                          epsilon_high, clip_ratio_c, beta, entropy_coef, max_completion_length, tis_cap, kl_clamp,
                          log_ratio_clamp, delta, use_bias_correction_kl, sapo_temperature_pos,
                          sapo_temperature_neg):
        grad_entropy_shape = logp.shape if entropy is not None and entropy_coef != 0 else (0,)
        return (logp.new_empty(()), torch.empty_like(logp), logp.new_empty(grad_entropy_shape),
                logp.new_empty(len(METRICS)))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])

    def _backward(ctx, grad_loss, *_unused):
        grad_logp, grad_entropy = ctx.saved_tensors
        d_entropy = grad_loss * grad_entropy if grad_entropy.numel() else None
        return (grad_loss * grad_logp, None, None, None, None, d_entropy) + (None,) * 17

    torch.library.register_autograd(lib + "policy_loss", _backward, setup_context=_setup)

    @torch.library.register_fake(lib + "group_advantages")
    def _group_advantages_fake(rewards, group_size, estimator, eps):
        groups = rewards.shape[0] // group_size
        return torch.empty_like(rewards), rewards.new_empty(groups), rewards.new_empty(groups)

    @torch.library.register_fake(lib + "sample_tokens")
    def _sample_tokens_fake(logits, uniform, temperature, top_k, top_p):
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows)

    @torch.library.register_fake(lib + "paged_decode")
    def _paged_decode_fake(q, k_pool, v_pool, table, lens, rows, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:2])

    @torch.library.register_fake(lib + "exact_attention")
    def _exact_attention_fake(q, k, v, seen, scale):
        return torch.empty_like(q)


def _f32(t: torch.Tensor | None, detach: bool = True) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach() if detach else t
    return t.float().contiguous()


def _op_option(o, name: str):
    """LossOptions ``o``'s field ``name`` as the op takes it: ``epsilon_high`` resolved (None: the
    low one), ``max_completion_length`` 0 when None."""
    if name == "epsilon_high":
        return o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    if name == "max_completion_length":
        return o.max_completion_length or 0
    return getattr(o, name)


def policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, sampling_logprobs, o,
                loss_type: int, level: int):
    """``kernels.policy_loss`` on the C++ op, with its validated inputs (``advantages`` (B,), (B, 1)
    or (B, T)) and ``LossOptions`` ``o``; ``loss_type`` is ``LOSS_SPECS[o.loss_type].cpp_id``, ``level``
    indexes ``LEVELS``. The options go by name (the op's schema names LossOptions fields), and
    ``num_items_in_batch`` only for a ``num_items`` normaliser. Gradients flow to ``logprobs`` and
    ``entropy`` only (the other inputs are constants, as in every caller)."""
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]  # (B,)
    num_items = o.num_items_in_batch if LOSS_SPECS[o.loss_type].normaliser == "num_items" else None
    if num_items is not None:
        num_items = torch.as_tensor(num_items).detach().to(device=logprobs.device, dtype=torch.float32).reshape(1)
    loss, _, _, metrics = torch.ops.medix_fast.policy_loss(
        _f32(logprobs, detach=False), _f32(old_logprobs), _f32(advantages), _f32(mask), _f32(ref_logprobs),
        _f32(entropy, detach=False), _f32(sampling_logprobs), num_items, loss_type, level,
        **{name: _op_option(o, name) for name in _OPTIONS})
    metrics = metrics.detach()
    return loss, {name: metrics[i] for i, name in enumerate(METRICS)}


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: int, eps: float):
    """``kernels.group_advantages`` on the C++ op: (advantages (N,), mean (G,), std (G,)), float32."""
    return torch.ops.medix_fast.group_advantages(_f32(rewards), group_size, estimator, eps)


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  uniform: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Sample one token per row of ``logits`` (B, V): top-k, then top-p (ties at either cut are
    kept together), at ``temperature`` (0: greedy, first index on ties), by inverse CDF with one
    uniform number per row (``uniform`` (B,) in [0, 1), else drawn from ``generator`` on the
    logits' device: no host synchronisation).

    Returns ``(tokens (B,) int64, logprobs (B,) float32)``: the log-probs are
    ``log_softmax(logits / temperature)`` at the tokens, untruncated by top-k/top-p (the "raw"
    mode of ``medix_fast.generate.tokens``; with temperature 0, ``log_softmax(logits)``).
    Needs :func:`supports` for the logits' device.
    """
    if uniform is None:
        uniform = torch.rand(logits.shape[0], device=logits.device, generator=generator)  # (B,)
    return torch.ops.medix_fast.sample_tokens(_f32(logits), _f32(uniform), float(temperature), int(top_k),
                                              float(top_p))


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor, rows: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over paged K/V on the C++ op (CPU): the contract of
    ``medix_fast.generate.attention.paged_attention`` without its scratch row: the rows' output
    (b, H, D) and log-sum-exp (b, H), in the pool's accumulation type (fp32; fp64 for fp64 pools).
    Needs :func:`supports` for the CPU."""
    acc = torch.float64 if k_pool.dtype == torch.float64 else torch.float32
    return torch.ops.medix_fast.paged_decode(
        q.to(acc).contiguous(), k_pool, v_pool, table.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous(),
        None if rows is None else rows.contiguous(), float(scale))


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float) -> torch.Tensor:
    """``medix_fast.kernels.exact.attention``'s forward on the C++ op (CPU): q, k, v in one dtype, read
    in place (their last dimension contiguous); (S, Tq, H, D) fp32."""
    q, k, v = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (q, k, v))
    return torch.ops.medix_fast.exact_attention(q, k, v, seen.long().contiguous(), float(scale))
