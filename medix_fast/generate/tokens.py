"""Next-token sampling on the device, one uniform number per row from a counter-based hash.

    u = uniforms(keys, steps)                       # (B,) in [0, 1): depends on (key, step) only
    tokens, logprobs, fits = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.9), u)

Noise. A row's key is a 32-bit hash of (seed, row) made on the host (:func:`row_key`); its
uniform at decode step ``t`` is a hash of (key, t) computed on the device (:func:`uniforms`). No
generator state is consumed, so a row's tokens depend only on (seed, prompt, sample index, step)
and never on which rows shared its batch or when the scheduler ran it (continuous batching and
preemption cannot change a completion).

Truncation (as the C++ op ``medix_fast.kernels.cpp.sample_tokens``, ties kept together):
``scaled = logits / T``; top-k keeps ``scaled >= `` the k-th largest value; top-p then keeps every
token whose strictly more likely tokens (under the top-k renormalised softmax) hold less than
``top_p`` of the mass, so the most likely token is always kept. The token is drawn by inverse CDF
in vocabulary order: the first kept token whose cumulative mass exceeds ``u * total``.
Temperature 0 is greedy (argmax, first index on ties, as ``torch.argmax`` and transformers).

No full sort of the vocabulary: the top-p threshold is found among the ``top_k`` largest values,
or, without top-k, among the ``prefilter`` largest (a ``topk``, not a sort). ``fits`` (B,) says
whether each row's nucleus ended inside those candidates; where it did not, the caller samples
the step again with ``prefilter=V`` (exact; the same uniforms give the same token wherever both
are exact) and raises its prefilter for later steps.

On the CPU, at large vocabularies, the C++ op ``medix_fast.kernels.cpp.sample_tokens`` (same
truncation, same inverse CDF: the same tokens for the same uniforms) does the step: bench_cpp
measures it 1.3-5x the PyTorch step at Qwen's 151,936 entries, but slower at 4,096
(``CPP_MIN_VOCAB``); it returns "raw" log-probs only.

Returned log-probs (fp32), chosen by ``logprobs_mode``:
- "raw" (default): ``log_softmax(logits / T)`` of the chosen token, without top-k/top-p
  truncation: what a trainer computes from its own forward at the same temperature, so the
  importance ratio of an unchanged policy is exactly 1. With T = 0 it is ``log_softmax(logits)``.
- "processed": the log-prob under the distribution actually sampled from, after top-k/top-p
  renormalisation (0 for greedy).
``exact`` (a model in exact mode, ``model/exact.py``): the "raw" log-probs by
``medix_fast.kernels.exact.token_logprobs``, the log-softmax the trainer takes in that mode.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import sampling_error
from ..kernels import dispatch
from ..kernels.exact import token_logprobs

LOGPROBS_MODES = ("raw", "processed")
CPP_MIN_VOCAB = 32768  # the C++ step wins above this vocabulary size on the CPU (bench/bench_cpp.py)
PREFILTER = 1024  # candidates of the top-p threshold search without top-k (grown when a nucleus is larger)
_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # < 2**31: x * m stays below 2**63 for any 32-bit x (no int64 overflow)
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    logprobs_mode: str = "raw"  # "raw" | "processed", see the module docstring
    exact: bool = False  # "raw" log-probs by the exact mode's log-softmax

    def __post_init__(self):
        error = sampling_error(self.temperature, self.top_p, self.top_k)  # the config's rule (sampling.*)
        if error:
            raise ValueError(error)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.exact and self.logprobs_mode != "raw":
            raise ValueError("exact mode returns the raw log-probs (what the trainer recomputes), not 'processed'")

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


# ----------------------------------------------------------------------------- counter-based noise
def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32_int` on an int64 tensor of 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def row_key(seed: int, row: int) -> int:
    """The 32-bit noise key of output row ``row`` (prompt * n + sample) of a call seeded ``seed``."""
    return _mix32_int(_mix32_int(seed & _MASK32) ^ _mix32_int((seed >> 32) + _GOLDEN) ^ _mix32_int(row * 2 + 1))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) (B,) fp32 for rows with int64 ``keys`` (B,) at decode ``steps`` (B,):
    24 bits of a hash of (key, step), on the keys' device."""
    h = _mix32(keys ^ _mix32(steps * 2 + _GOLDEN))  # (B,)
    return (h >> 8).float() * (1.0 / (1 << 24))


# ----------------------------------------------------------------------------- sampling
def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor,
                  prefilter: int = PREFILTER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` (B, V) with ``uniform`` (B,) in [0, 1). Returns tokens (B,)
    int64, log-probs (B,) fp32 and ``fits`` (B,) bool (see the module docstring)."""
    logits = logits.float()
    if params.exact:
        tokens, _, fits = sample_tokens(logits, replace(params, exact=False), uniform, prefilter)
        return tokens, token_logprobs(logits, tokens, 1.0 / params.temperature if params.temperature else 1.0), fits
    rows, vocab = logits.shape
    fits = torch.ones(rows, dtype=torch.bool, device=logits.device)
    if _use_cpp(logits, params):
        from ..kernels import cpp
        tokens, logprobs = cpp.sample_tokens(logits, temperature=params.temperature, top_k=params.top_k,
                                             top_p=params.top_p, uniform=uniform)
        return tokens, logprobs, fits
    if params.temperature == 0:
        tokens = logits.argmax(-1)  # (B,)
        if params.logprobs_mode == "processed":
            return tokens, torch.zeros(rows, device=logits.device), fits
        return tokens, _pick(logits, tokens) - logits.logsumexp(-1), fits
    scaled = logits / params.temperature if params.temperature != 1 else logits  # (B, V)
    lse = scaled.logsumexp(-1, keepdim=True)  # (B, 1)
    probs = (scaled - lse).exp_()  # (B, V)
    if params.truncates:
        cut, fits = _cut(scaled, lse, probs, params.top_k, params.top_p, prefilter)  # (B, 1), (B,)
        probs = probs.masked_fill_(scaled < cut, 0.0)
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    tokens = torch.searchsorted(cdf, uniform[:, None].float() * total, right=True)[:, 0].clamp_max_(vocab - 1)
    raw = _pick(scaled, tokens) - lse[:, 0]
    if params.logprobs_mode == "processed" and params.truncates:
        return tokens, _pick(probs, tokens).log() - total[:, 0].log(), fits
    return tokens, raw, fits


def _use_cpp(logits: torch.Tensor, params: SamplingParams) -> bool:
    """The C++ step: CPU logits, raw log-probs, and a vocabulary where it wins (or forced)."""
    if logits.device.type != "cpu" or params.logprobs_mode != "raw":
        return False
    if dispatch.requested_backend() == "cpp":
        return dispatch.use_cpp(logits)
    return logits.shape[1] >= CPP_MIN_VOCAB and dispatch.use_cpp(logits)


def _cut(scaled: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor, top_k: int, top_p: float, prefilter: int):
    """The smallest kept value (B, 1) of top-k then top-p, and whether the top-p search's
    candidates held the whole nucleus (B,)."""
    vocab = scaled.shape[1]
    k = min(top_k, vocab) if top_k > 0 else min(prefilter, vocab)
    values = scaled.topk(k, -1).values  # (B, k), descending: a selection, no full sort unless k == V
    fits = torch.ones(scaled.shape[0], dtype=torch.bool, device=scaled.device)
    cut = values[:, -1:] if top_k > 0 else torch.full_like(values[:, :1], float("-inf"))  # (B, 1)
    if top_p >= 1:
        return cut, fits
    mass = (values - lse).exp()  # (B, k) softmax mass of the candidates
    if top_k > 0:  # top-p over the top-k renormalised softmax (transformers' order)
        mass = mass / probs.masked_fill(scaled < cut, 0.0).sum(-1, keepdim=True)
    elif k < vocab:
        fits = mass.sum(-1) >= top_p  # the nucleus closed inside the candidates
    inside = (mass.cumsum(-1) - mass) < top_p  # (B, k): less than top_p strictly before; a prefix
    count = inside.sum(-1, keepdim=True)  # (B, 1), >= 1
    return torch.maximum(cut, values.gather(-1, count - 1)), fits


def _pick(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, tokens[:, None])[:, 0]  # (B,)
