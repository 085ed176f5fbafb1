"""Next-token sampling on the device with no host synchronisation.

    tokens, logprobs = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.9), generator)

Algorithm: the logits are divided by the temperature, then top-k and top-p (nucleus, applied
after top-k, as in transformers) set excluded tokens to -inf, and one token per row is drawn
from the softmax p of what is left, by one of two exact methods (``method``):
- "race", the exponential race of gpt-fast: ``argmax(p / E)`` with E ~ Exponential(1) per token,
  taken as ``argmax(logits - log E)`` (the row's log-normaliser does not change the argmax);
  embarrassingly parallel, the CUDA default.
- "cdf", inverse transform: the first token whose cumulative probability exceeds U * total,
  U ~ Uniform[0, 1) per row; one random number per row instead of one per token (the CPU
  generator is slow), the CPU default.
Both draw from a seeded ``torch.Generator`` and never wait for the host. Temperature 0 is greedy
(argmax of the raw logits, first index on ties, as ``torch.argmax`` and transformers).

Returned log-probs (fp32), chosen by ``logprobs_mode``:
- "raw" (default): ``log_softmax(logits / T)`` of the chosen token, without top-k/top-p
  truncation: what a trainer computes from its own forward at the same temperature, so the
  importance ratio of an unchanged policy is exactly 1. With T = 0 it is ``log_softmax(logits)``.
- "processed": the log-prob under the distribution actually sampled from, after top-k/top-p
  renormalisation (0 for greedy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOGPROBS_MODES = ("raw", "processed")
METHODS = ("race", "cdf")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    logprobs_mode: str = "raw"  # "raw" | "processed", see the module docstring

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, method: str = "race"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (B, V); return tokens (B,) long and log-probs (B,) fp32."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)  # (B,)
        if params.logprobs_mode == "processed":
            return tokens, torch.zeros(tokens.shape, device=logits.device)
        return tokens, _pick(logits, tokens) - logits.logsumexp(-1)
    scaled = logits / params.temperature if params.temperature != 1 else logits  # (B, V)
    truncated = truncate_logits(scaled, params.top_k, params.top_p)  # (B, V)
    if method == "race":
        race = torch.rand(scaled.shape, generator=generator, device=scaled.device).log_().neg_()  # E ~ Exp(1)
        tokens = (truncated - race.clamp_min_(torch.finfo(torch.float32).tiny).log_()).argmax(-1)  # (B,)
    elif method == "cdf":
        probs = torch.softmax(truncated, -1)  # (B, V)
        cdf = probs.cumsum(-1)  # (B, V)
        u = torch.rand(scaled.shape[0], 1, generator=generator, device=scaled.device)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_max_(scaled.shape[1] - 1)
        if truncated is scaled or params.logprobs_mode == "processed":  # the sampled distribution is the one asked
            return tokens, _pick(probs, tokens).log()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    chosen = truncated if params.logprobs_mode == "processed" else scaled
    return tokens, _pick(chosen, tokens) - chosen.logsumexp(-1)


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set tokens outside the top-k, then outside the top-p nucleus, to -inf; (B, V) -> (B, V).
    The nucleus is the smallest prefix of the sorted tokens whose probability reaches top_p
    (the most likely token is always kept). Returns ``scaled`` itself when both are off."""
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = scaled.topk(top_k, -1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.softmax(scaled, -1).sort(-1, descending=True)  # (B, V)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before the token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _pick(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, tokens[:, None])[:, 0]  # (B,)
