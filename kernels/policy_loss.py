"""The clipped-ratio policy loss of GRPO, DAPO, Dr. GRPO and GSPO from per-token log-probs.

One formula covers every variant (TRL GRPOTrainer's aggregation, EasyR1/veRL's clipping):

    log_w  = logp - old                          token level (GRPO, DAPO)
           = masked_mean_t(logp - old)           sequence level (GSPO), gradient through the mean
           = sg[masked_mean_t(logp - old)] + logp - sg[logp]     sequence_token (GSPO-token)
    ratio  = exp(log_w)   (log_w clamped to +-log_ratio_clamp first when given: EasyR1/veRL's 20)
    clipped = exp(clamp(log_w, log(1-eps_low), log(1+eps_high)))
    pg     = max(-A * ratio, -A * clipped);  for A < 0 and clip_ratio_c: min(pg, -A * clip_ratio_c)
    pg    *= min(exp(old - sampling), tis_cap)   optional truncated importance sampling (detached)
    loss_t = pg + beta * k3(ref, logp) - entropy_coef * entropy
    k3     = exp(d) - d - 1 with d = ref - logp (TRL, Liger: kl_clamp=None)
           = clamp(exp(d') - d' - 1, -c, c) with d' = clamp(d, -20, 20) for kl_clamp=c (veRL/EasyR1's
             low_var_kl, c = 10): past d ~ 2.6 nats (k3 > 10) the token's KL gradient is exactly 0

and ``loss_type`` picks the aggregation of ``loss_t`` over valid (mask = 1) tokens:
    grpo     mean over sequences of the per-sequence token mean
    bnpo     sum / valid tokens of this batch
    dr_grpo  sum / (B * max_completion_length)
    dapo     sum / num_items_in_batch (the global token count; default: this batch's)

``old_logprobs=None`` means on-policy: the ratio is 1 in value and the gradient still flows.
Metrics come back as detached 0-dim tensors (no host synchronisation).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import cpp
from .dispatch import backend_for

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence", "sequence_token")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Every option of :func:`policy_loss` and ``fused_linear_policy_loss``."""

    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon_low
    clip_ratio_c: float | None = None  # dual clip for negative advantages (EasyR1: 3.0)
    beta: float = 0.0  # k3 KL coefficient (needs ref_logprobs)
    entropy_coef: float = 0.0  # entropy bonus (needs entropy)
    max_completion_length: int | None = None  # dr_grpo normaliser
    num_items_in_batch: float | torch.Tensor | None = None  # dapo normaliser
    tis_cap: float | None = None  # truncated importance sampling cap (needs sampling_logprobs; old may be None)
    kl_clamp: float | None = None  # None: the k3 KL exactly (TRL, Liger); c: low_var_kl clamps (EasyR1: 10)
    log_ratio_clamp: float | None = None  # None: exp(log_w) as TRL; r: log_w clamped to [-r, r] (veRL: 20)

    @classmethod
    def from_kwargs(cls, opts: dict) -> "LossOptions":
        unknown = sorted(set(opts) - OPTION_NAMES)
        if unknown:
            raise ValueError(f"unknown policy-loss option(s) {unknown}; valid: {sorted(OPTION_NAMES)}")
        o = cls(**opts)
        if o.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {o.loss_type!r}")
        if o.importance_sampling_level not in LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {o.importance_sampling_level!r}")
        if not 0 <= o.epsilon_low < 1 or (o.epsilon_high is not None and o.epsilon_high < 0):
            raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {o.epsilon_low}, {o.epsilon_high}")
        if o.clip_ratio_c is not None and o.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {o.clip_ratio_c}")
        if o.loss_type == "dr_grpo" and not (o.max_completion_length or 0) > 0:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length > 0")
        if o.tis_cap is not None and o.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {o.tis_cap}")
        for name in ("kl_clamp", "log_ratio_clamp"):
            if getattr(o, name) is not None and not getattr(o, name) > 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(o, name)}")
        return o


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(LossOptions))  # a constant: torch.compile traces it


def _check_shapes(lead, lead_name, mask, advantages, **per_token) -> None:
    if lead.dim() != 2:
        raise ValueError(f"{lead_name} must be (B, T), got {tuple(lead.shape)}")
    shape = tuple(lead.shape)
    for name, t in {"mask": mask, **per_token}.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of {lead_name} {shape}, got {tuple(t.shape)}")
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages must be ({shape[0]},) or {shape}, got {tuple(advantages.shape)}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregation_weights(mask: torch.Tensor, o: LossOptions) -> torch.Tensor:
    """(B, T) weights with loss = sum(loss_t * weights): the ``loss_type`` normalisers, per token."""
    if o.loss_type == "grpo":
        return mask / (mask.shape[0] * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if o.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if o.loss_type == "dr_grpo":
        return mask / (mask.shape[0] * o.max_completion_length)
    return mask / (mask.sum().clamp(min=1.0) if o.num_items_in_batch is None else o.num_items_in_batch)


def per_token_loss(logp, old, adv, mask, o: LossOptions, *, ref=None, entropy=None, sampling=None):
    """loss_t (B, T) before aggregation, with the ratio (B, T), dual-clip flags and k3 KL (or None).

    Elementwise in every input at ``importance_sampling_level="token"``, so a caller may pass any
    (1, n) slice of tokens; the sequence levels need whole rows (``mask`` gives their lengths).
    """
    log_w = logp - old  # (B, T)
    if o.importance_sampling_level != "token":
        seq = _masked_mean(log_w, mask, dim=-1)[:, None]  # (B, 1)
        log_w = seq.expand_as(logp) if o.importance_sampling_level == "sequence" else (
            seq.detach() + logp - logp.detach())
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    r = o.log_ratio_clamp
    ratio = torch.exp(log_w if r is None else log_w.clamp(-r, r))  # (B, T)
    clipped = torch.exp(log_w.clamp(math.log1p(-o.epsilon_low), math.log1p(eps_high)))
    pg = torch.maximum(-adv * ratio, -adv * clipped)  # (B, T)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if o.clip_ratio_c is not None:
        dual = (adv < 0) & (pg > -adv * o.clip_ratio_c)
        pg = torch.where(dual, -adv * o.clip_ratio_c, pg)
    if o.tis_cap is not None:
        pg = pg * torch.exp(old - sampling).clamp(max=o.tis_cap)
    loss_t = pg
    kl = None
    if ref is not None:
        d = ref - logp if o.kl_clamp is None else (ref - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0  # (B, T)
        kl = kl if o.kl_clamp is None else kl.clamp(-o.kl_clamp, o.kl_clamp)
        if o.beta > 0:
            loss_t = loss_t + o.beta * kl
    if o.entropy_coef != 0:
        loss_t = loss_t - o.entropy_coef * entropy
    return loss_t, ratio, dual, kl


METRICS = cpp.METRICS  # ratio_mean, clip_low, clip_high, clip_dual, kl, entropy (the C++ op's order too)


def metric_sums(ratio, dual, kl, entropy, adv, mask, o: LossOptions) -> torch.Tensor:
    """(6,) masked token sums of the ratio, clip flags, KL and entropy, in :data:`METRICS` order:
    the numerators of :func:`loss_metrics`, so chunks of tokens can add theirs up."""
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    with torch.no_grad():
        r = ratio.detach()
        zero = torch.zeros_like(r)
        terms = (r, ((r < 1 - o.epsilon_low) & (adv < 0)).float(), ((r > 1 + eps_high) & (adv > 0)).float(),
                 dual.float(), zero if kl is None else kl.detach(), zero if entropy is None else entropy.detach())
        return torch.stack([(t * mask).sum() for t in terms])  # (6,)


def metrics_from_sums(sums: torch.Tensor, valid_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token means from :func:`metric_sums` and the valid-token count, as detached 0-dim tensors."""
    means = sums / valid_tokens.clamp(min=1.0)  # (6,)
    return {name: means[i] for i, name in enumerate(METRICS)}


def loss_metrics(ratio, dual, kl, entropy, adv, mask, o: LossOptions) -> dict[str, torch.Tensor]:
    """Masked token means of the ratio, clip fractions, KL and entropy, as detached 0-dim tensors."""
    return metrics_from_sums(metric_sums(ratio, dual, kl, entropy, adv, mask, o), mask.sum())


def prepare(lead, old_logprobs, advantages, mask, ref_logprobs, entropy, sampling_logprobs, opts,
            lead_name="logprobs", computes_entropy=False):
    """Validate the inputs of a policy-loss call and return them as fp32 tensors plus the options.

    ``lead`` is the (B, T) tensor the others must match (the log-probs, or the fused path's targets,
    which ``computes_entropy`` itself).
    """
    o = LossOptions.from_kwargs(opts)
    _check_shapes(lead, lead_name, mask, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  entropy=entropy, sampling_logprobs=sampling_logprobs)
    if o.beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if o.entropy_coef != 0 and entropy is None and not computes_entropy:
        raise ValueError("entropy_coef != 0 needs entropy")
    if o.tis_cap is not None and sampling_logprobs is None:
        raise ValueError("tis_cap needs sampling_logprobs (old_logprobs=None: on-policy, the current log-probs)")
    def f32(x):
        return None if x is None else x.float()

    adv = advantages.float()
    adv = adv[:, None] if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    return o, f32(old_logprobs), adv, mask.float(), f32(ref_logprobs), f32(entropy), f32(sampling_logprobs)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, entropy=None,
                sampling_logprobs=None, **opts):
    """Clipped-ratio policy loss from per-token log-probs (see the module docstring).

    Args:
        logprobs: (B, T) log-probs of the taken tokens under the current policy (requires grad).
        old_logprobs: (B, T) behaviour-policy log-probs, or None for on-policy (ratio 1).
        advantages: (B,) per sequence or (B, T) per token.
        mask: (B, T) 1 for completion tokens that count, 0 for padding.
        ref_logprobs: (B, T) reference-model log-probs, needed when ``beta > 0``.
        entropy: (B, T) per-token entropy, needed when ``entropy_coef != 0`` (reported if given).
        sampling_logprobs: (B, T) log-probs from the sampler, for ``tis_cap``.
        **opts: fields of :class:`LossOptions` (loss_type, importance_sampling_level, epsilon_low,
            epsilon_high, clip_ratio_c, beta, entropy_coef, max_completion_length,
            num_items_in_batch, tis_cap, kl_clamp, log_ratio_clamp).

    Returns:
        (loss, metrics): a 0-dim float32 loss and a dict of detached 0-dim tensors
        ``ratio_mean, clip_low, clip_high, clip_dual, kl, entropy`` (masked token means).
    """
    o, old, adv, mask, ref, entropy, sampling = prepare(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, sampling_logprobs, opts)
    if backend_for("policy_loss", logprobs) == "cpp":
        return cpp.policy_loss(logprobs, old, adv, mask, ref, entropy, sampling, o, LOSS_TYPES.index(o.loss_type),
                               LEVELS.index(o.importance_sampling_level))
    logp = logprobs.float()  # (B, T)
    old = logp.detach() if old is None else old
    loss_t, ratio, dual, kl = per_token_loss(logp, old, adv, mask, o, ref=ref, entropy=entropy, sampling=sampling)
    loss = (loss_t * aggregation_weights(mask, o)).sum()
    return loss, loss_metrics(ratio, dual, kl, entropy, adv, mask, o)
