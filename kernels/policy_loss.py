"""The policy loss of GRPO, DAPO, Dr. GRPO, GSPO, CISPO, SAPO, LUSPO and VESPO from per-token log-probs.

One formula covers every variant (TRL 1.16 GRPOTrainer's ``_compute_loss``, EasyR1/veRL's clipping):

    log_w  = logp - old                          token level (GRPO, DAPO)
           = masked_mean_t(logp - old)           sequence level (GSPO), gradient through the mean
           = sg[masked_mean_t(logp - old)] + logp - sg[logp]     sequence_token (GSPO-token)
    ratio  = exp(log_w)   (log_w clamped to +-log_ratio_clamp first when given: EasyR1/veRL's 20)
    pg     = max(-A * min(ratio, delta), -A * clip(ratio, 1-eps_low, 1+eps_high))   clipped types;
             delta optional (two-sided clipping); for A < 0 and clip_ratio_c: min(pg, -A * clip_ratio_c)
           = -sg[min(ratio, eps_high)] * A * logp                          cispo
           = -4 / tau * sigmoid(tau * (ratio - 1)) * A, tau = tau_pos if A > 0 else tau_neg   sapo
           = -sg[phi(w)] * A * logp, w = exp(clamp(sum_t clamp(logp - old, +-20), log 1e-8, 20))
             per sequence, phi(w) = exp(lam + k log w - lam w), (k, lam) by the sign of A    vespo
    pg    *= [A >= 0 or masked_mean_t(behaviour - sg[logp]) <= off_policy_mask_threshold]   (OPSM;
             behaviour = sampling_logprobs if given, else old)
    pg    *= [entropy >= the (1 - top_entropy_quantile) quantile of the valid tokens' entropies]
    pg    *= min(exp(old - sampling), tis_cap)   optional truncated importance sampling (detached)
    loss_t = pg + beta * k3(ref, logp) (* ratio with use_bias_correction_kl)
    k3     = exp(d) - d - 1 with d = ref - logp (TRL, Liger: kl_clamp=None)
           = clamp(exp(d') - d' - 1, -c, c) with d' = clamp(d, -20, 20) for kl_clamp=c (veRL/EasyR1's
             low_var_kl, c = 10): past d ~ 2.6 nats (k3 > 10) the token's KL gradient is exactly 0

and ``loss_type`` picks the policy term ``pg`` (the clipped one, cispo, sapo or vespo) and the
aggregation of ``loss_t`` over valid (mask = 1) tokens: its row of ``LOSS_SPECS``
(kernels/loss_specs.py: the term and the normaliser of each loss type, what each normaliser divides by).
The entropy bonus ``- entropy_coef * H`` takes H aggregated as the loss (``entropy_aggregation="loss"``,
veRL) or as the mean over the tokens the policy term acts on (``"token_mean"``, TRL).

``old_logprobs=None`` means on-policy: the ratio is 1 in value and the gradient still flows.
Metrics come back as detached 0-dim tensors (no host synchronisation).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import cpp
from .dispatch import backend_for
from .loss_specs import LOSS_SPECS, LOSS_TYPES

LEVELS = ("token", "sequence", "sequence_token")
ENTROPY_AGGREGATIONS = ("loss", "token_mean")


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
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta (INTELLECT-2)
    use_bias_correction_kl: bool = False  # the KL times the importance ratio (DeepSeek-V3.2)
    entropy_aggregation: str = "loss"  # the entropy bonus's H: "loss" (veRL), "token_mean" (TRL)
    top_entropy_quantile: float = 1.0  # < 1: the policy term on the top q of tokens by entropy (needs entropy)
    off_policy_mask_threshold: float | None = None  # OPSM: drop A < 0 sequences whose mean KL to the sampler > it
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def features(self) -> frozenset[str]:
        """The options beyond the C++ op's (kernels/dispatch.py routes calls using one to PyTorch)."""
        used = {self.loss_type} - {"grpo", "bnpo", "dr_grpo", "dapo"}  # the loss types beyond TRL's first four
        used |= {name for name, on in (("delta", self.delta is not None),
                                       ("use_bias_correction_kl", self.use_bias_correction_kl and self.beta > 0),
                                       ("entropy_token_mean", self.entropy_aggregation != "loss"),
                                       ("top_entropy_quantile", self.top_entropy_quantile < 1),
                                       ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None)) if on}
        return frozenset(used)

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
        if LOSS_SPECS[o.loss_type].normaliser == "max_length" and not (o.max_completion_length or 0) > 0:
            raise ValueError(f"loss_type={o.loss_type!r} needs max_completion_length > 0")
        if o.tis_cap is not None and o.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0, got {o.tis_cap}")
        if o.entropy_aggregation not in ENTROPY_AGGREGATIONS:
            raise ValueError(f"entropy_aggregation must be one of {ENTROPY_AGGREGATIONS}, got {o.entropy_aggregation!r}")
        if not 0 < o.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {o.top_entropy_quantile}")
        if o.delta is not None and not o.delta > 0:
            raise ValueError(f"delta must be > 0 (TRL recommends > 1 + epsilon_high), got {o.delta}")
        if min(o.sapo_temperature_pos, o.sapo_temperature_neg) <= 0:
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
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
    """(B, T) weights with loss = sum(loss_t * weights): the ``loss_type``'s normaliser, per token."""
    normaliser = LOSS_SPECS[o.loss_type].normaliser
    if normaliser == "sequence_mean":
        return mask / (mask.shape[0] * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if normaliser == "batch_tokens":
        return mask / mask.sum().clamp(min=1.0)
    if normaliser == "max_length":
        return mask / (mask.shape[0] * o.max_completion_length)
    if normaliser == "sequences":
        return mask / mask.shape[0]
    if normaliser == "num_items":
        return mask / (mask.sum().clamp(min=1.0) if o.num_items_in_batch is None else o.num_items_in_batch)
    raise AssertionError(f"normaliser {normaliser!r} of loss_type {o.loss_type!r} is not implemented")


def entropy_weights(mask: torch.Tensor, keep: torch.Tensor | None, o: LossOptions,
                    weights: torch.Tensor) -> torch.Tensor | None:
    """(B, T) weights of the entropy bonus: the loss's ``weights`` (``entropy_aggregation="loss"``),
    or the mean over the valid tokens the policy term acts on (``"token_mean"``, TRL); None without
    a bonus."""
    if o.entropy_coef == 0:
        return None
    if o.entropy_aggregation == "loss":
        return weights
    m = mask if keep is None else mask * keep
    return m / m.sum().clamp(min=1.0)


def masked_quantile(x: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """0-dim ``torch.quantile`` (linear interpolation) of ``x`` over mask != 0, without a host sync:
    the valid values sort first, padding is +inf."""
    valid = mask != 0
    ordered = torch.where(valid, x.float(), float("inf")).reshape(-1).sort().values  # (N,)
    rank = q * (valid.sum().float() - 1).clamp(min=0.0)
    at = torch.stack([rank.floor(), rank.ceil()]).long()  # (2,): gathered, not indexed by a 0-dim tensor (a sync)
    below, above = ordered.gather(0, at)
    return torch.lerp(below, above, rank - rank.floor())


def entropy_keep(entropy: torch.Tensor, mask: torch.Tensor, o: LossOptions) -> torch.Tensor | None:
    """(B, T) 1.0 where the policy term acts under ``top_entropy_quantile`` (the tokens whose entropy
    is at least the (1 - q) quantile of the valid tokens'), or None when it is 1."""
    if o.top_entropy_quantile >= 1:
        return None
    threshold = masked_quantile(entropy.detach(), mask, 1 - o.top_entropy_quantile)
    return ((entropy.detach() * mask >= threshold) & (mask != 0)).float()


def _vespo_weights(log_ratio, adv, mask, o: LossOptions) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) of each sequence's ratio w, (B, 1) or (B, T) with ``adv``."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)  # (B, 1)
        k = torch.where(adv >= 0, o.vespo_k_pos, o.vespo_k_neg)
        lam = torch.where(adv >= 0, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def per_token_loss(logp, old, adv, mask, o: LossOptions, *, ref=None, sampling=None, keep=None):
    """loss_t (B, T) before aggregation (without the entropy bonus), with the ratio the clip metrics
    read (B, T), dual-clip flags and the KL term (or None). ``keep``: the (B, T) 0/1 factor of the
    policy term (:func:`entropy_keep`) or None.

    Elementwise in every input at ``importance_sampling_level="token"``, so a caller may pass any
    (1, n) slice of tokens; the sequence levels, ``vespo`` and ``off_policy_mask_threshold`` need
    whole rows (``mask`` gives their lengths).
    """
    log_ratio = logp - old  # (B, T)
    log_w = log_ratio
    if o.importance_sampling_level != "token":
        seq = _masked_mean(log_w, mask, dim=-1)[:, None]  # (B, 1)
        log_w = seq.expand_as(logp) if o.importance_sampling_level == "sequence" else (
            seq.detach() + logp - logp.detach())
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    r = o.log_ratio_clamp
    ratio = torch.exp(log_w if r is None else log_w.clamp(-r, r))  # (B, T)
    dual = torch.zeros_like(ratio, dtype=torch.bool)
    shown = ratio  # what the clip metrics read
    term = LOSS_SPECS[o.loss_type].term
    if term == "cispo":
        pg = -ratio.clamp(max=eps_high).detach() * adv * logp
    elif term == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif term == "vespo":
        pg = -_vespo_weights(log_ratio, adv, mask, o) * adv * logp
    elif term == "clip":
        shown = ratio if o.delta is None else ratio.clamp(max=o.delta)
        clipped = torch.exp(log_w.clamp(math.log1p(-o.epsilon_low), math.log1p(eps_high)))
        pg = torch.maximum(-adv * shown, -adv * clipped)  # (B, T)
        if o.clip_ratio_c is not None:
            dual = (adv < 0) & (pg > -adv * o.clip_ratio_c)
            pg = torch.where(dual, -adv * o.clip_ratio_c, pg)
    else:
        raise AssertionError(f"term {term!r} of loss_type {o.loss_type!r} is not implemented")
    if o.off_policy_mask_threshold is not None:
        behaviour = old if sampling is None else sampling
        drift = _masked_mean(torch.nan_to_num(behaviour - logp.detach(), nan=0.0), mask, dim=-1)[:, None]  # (B, 1)
        pg = pg * ((adv >= 0) | (drift <= o.off_policy_mask_threshold)).to(pg.dtype)
    if keep is not None:
        pg = pg * keep
    if o.tis_cap is not None:
        pg = pg * torch.exp(old - sampling).clamp(max=o.tis_cap)
    loss_t = pg
    kl = None
    if ref is not None:
        d = ref - logp if o.kl_clamp is None else (ref - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1.0  # (B, T)
        kl = kl if o.kl_clamp is None else kl.clamp(-o.kl_clamp, o.kl_clamp)
        if o.use_bias_correction_kl:
            kl = kl * ratio
        if o.beta > 0:
            loss_t = loss_t + o.beta * kl
    return loss_t, shown, dual, kl


def weighted_loss(loss_t, entropy, weights, entropy_weights, o: LossOptions) -> torch.Tensor:
    """0-dim sum(loss_t * weights) - entropy_coef * sum(entropy * entropy_weights)."""
    loss = (loss_t * weights).sum()
    if o.entropy_coef != 0:
        loss = loss - o.entropy_coef * (entropy * entropy_weights).sum()
    return loss


METRICS = cpp.METRICS  # ratio_mean, clip_low, clip_high, clip_dual, kl, entropy (the C++ op's order too)


def metric_sums(ratio, dual, kl, entropy, adv, mask, o: LossOptions) -> torch.Tensor:
    """(6,) masked token sums of the ratio, clip flags, KL and entropy, in :data:`METRICS` order:
    the numerators of :func:`loss_metrics`, so chunks of tokens can add theirs up. The clip flags
    are TRL's, those of the loss type's term (``LossSpec.clips``): below 1 - eps_low with A < 0,
    above 1 + eps_high with A > 0 (cispo: above its cap eps_high with A > 0)."""
    eps_high = o.epsilon_low if o.epsilon_high is None else o.epsilon_high
    spec = LOSS_SPECS[o.loss_type]
    upper = eps_high if spec.term == "cispo" else 1 + eps_high
    with torch.no_grad():
        r = ratio.detach()
        zero = torch.zeros_like(r)
        low = ((r < 1 - o.epsilon_low) & (adv < 0)).float() if "low" in spec.clips else zero
        high = ((r > upper) & (adv > 0)).float() if "high" in spec.clips else zero
        terms = (r, low, high, dual.float(), zero if kl is None else kl.detach(),
                 zero if entropy is None else entropy.detach())
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
    if o.top_entropy_quantile < 1 and entropy is None and not computes_entropy:
        raise ValueError("top_entropy_quantile < 1 needs entropy")
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
        entropy: (B, T) per-token entropy, needed when ``entropy_coef != 0`` or
            ``top_entropy_quantile < 1`` (reported if given).
        sampling_logprobs: (B, T) log-probs from the sampler, for ``tis_cap`` and
            ``off_policy_mask_threshold`` (which falls back to ``old_logprobs``).
        **opts: fields of :class:`LossOptions`.

    Returns:
        (loss, metrics): a 0-dim float32 loss and a dict of detached 0-dim tensors
        ``ratio_mean, clip_low, clip_high, clip_dual, kl, entropy`` (masked token means).
    """
    o, old, adv, mask, ref, entropy, sampling = prepare(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, sampling_logprobs, opts)
    if backend_for("policy_loss", logprobs, o.features()) == "cpp":
        return cpp.policy_loss(logprobs, old, adv, mask, ref, entropy, sampling, o, LOSS_SPECS[o.loss_type].cpp_id,
                               LEVELS.index(o.importance_sampling_level))
    logp = logprobs.float()  # (B, T)
    old = logp.detach() if old is None else old
    keep = None if entropy is None else entropy_keep(entropy, mask, o)
    loss_t, ratio, dual, kl = per_token_loss(logp, old, adv, mask, o, ref=ref, sampling=sampling, keep=keep)
    weights = aggregation_weights(mask, o)
    loss = weighted_loss(loss_t, entropy, weights, entropy_weights(mask, keep, o, weights), o)
    return loss, loss_metrics(ratio, dual, kl, entropy, adv, mask, o)
