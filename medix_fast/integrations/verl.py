"""veRL with medix_fast's kernels: policy losses for its registry, and its fused log-prob kernel.

    from medix_fast.integrations.verl import register
    register()   # in each veRL process; veRL does it itself with
                 # actor_rollout_ref.model.external_lib=medix_fast.integrations.verl_plugin

``register()`` adds to ``verl.trainer.ppo.core_algos``' policy-loss registry (select one with
``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``):
  ``medix_vanilla``     veRL's ``vanilla``: token-level PPO clip with the dual clip (``clip_ratio_c``)
  ``medix_gspo``        GSPO: the sequence ratio exp(mean_t log r), gradient through the mean
  ``medix_gspo_token``  GSPO-token, veRL's ``gspo``: the sequence ratio's value, per-token gradient
each computed by :func:`medix_fast.kernels.policy_loss` from veRL's arguments ``(old_log_prob,
log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``, for every
``loss_agg_mode`` of veRL's ``agg_loss`` with ``config.global_batch_info`` (dp_size,
batch_num_tokens, global_batch_size, loss_scale_factor), returning veRL's metric names
(``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``) as 0-dim tensors, no host sync.
``rollout_is_weights`` (detached, >= 0) scale the advantages, which scales each token's clipped
term exactly (it is positively homogeneous in the advantage).
It also swaps ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``, the kernel veRL's
``fused_kernel_options.impl_backend=triton`` forward calls, for :func:`linear_cross_entropy`
(backed by :func:`medix_fast.kernels.fused_linear_logprobs`).

Known convention differences (tests/test_integrations_verl.py checks agreement up to these):
veRL divides ``seq-mean-token-mean`` by the non-empty rows (or ``global_batch_size``) and each row
by ``n_tokens + 1e-8`` (medix_fast's ``grpo`` divides by all rows and by ``max(n_tokens, 1)``; the
adapter rescales, so only the 1e-8 remains); veRL clamps the GSPO log-ratio at 10 from above only
(medix_fast at [-20, 20]); ``seq-mean-token-sum-norm`` divides by ``loss_scale_factor``, by default
the padded response length; ``actor/ppo_kl`` is taken on the log-ratio clamped to [-20, 20] (veRL's
``gspo`` does not clamp it); tokens whose ``rollout_is_weights`` are 0 do not count as clipped.
Not supported: a vocabulary-parallel head (``dist_process_group``), hence Megatron's fused path.

veRL needs nothing from medix_fast at import; this module imports veRL only inside :func:`register`,
which checks its version (:data:`SUPPORTED_VERL`).
"""
from __future__ import annotations

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from medix_fast.kernels import fused_linear_logprobs, policy_loss

SUPPORTED_VERL = SpecifierSet(">=0.9,<0.10")  # the PolicyLossFn signature and kernel slot tested here
LOSSES = {"medix_vanilla": "token", "medix_gspo": "sequence", "medix_gspo_token": "sequence_token"}
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def register(fused_kernel: bool = True) -> None:
    """Add the :data:`LOSSES` to veRL's policy-loss registry; with ``fused_kernel`` also make
    veRL's Triton fused-kernel forward call :func:`linear_cross_entropy`. Idempotent."""
    import verl
    from verl.trainer.ppo import core_algos

    if Version(verl.__version__) not in SUPPORTED_VERL:
        raise ImportError(f"medix_fast.integrations.verl supports verl{SUPPORTED_VERL}, found verl {verl.__version__}")

    for name, level in LOSSES.items():
        core_algos.register_policy_loss(name)(make_policy_loss(level))
    if fused_kernel:
        import verl.utils.kernel.linear_cross_entropy as verl_kernel

        verl_kernel.linear_cross_entropy = linear_cross_entropy


def aggregation(loss_agg_mode: str, mask: torch.Tensor, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None, loss_scale_factor=None) -> tuple[dict, object]:
    """veRL's ``agg_loss`` as medix_fast loss options and a factor on the loss: ``(opts, scale)``."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs global_batch_info['batch_num_tokens']")
        if batch_num_tokens is None:
            return dict(loss_type="bnpo"), 1.0
        return dict(loss_type="dapo", num_items_in_batch=batch_num_tokens / dp_size), 1.0
    if loss_agg_mode == "token-sum":
        return dict(loss_type="dapo", num_items_in_batch=1.0 / dp_size), 1.0
    if global_batch_size is None and dp_size > 1:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs "
                         "global_batch_info['global_batch_size']")
    rows = (mask.sum(-1) > 0).sum().float() if global_batch_size is None else global_batch_size  # non-empty rows
    if loss_agg_mode == "seq-mean-token-mean":
        return dict(loss_type="grpo"), mask.shape[0] * dp_size / rows  # grpo divides by all B rows
    norm = 1.0
    if loss_agg_mode == "seq-mean-token-sum-norm":
        norm = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    return dict(loss_type="dapo", num_items_in_batch=rows * norm / dp_size), 1.0


def make_policy_loss(level: str):
    """A veRL ``PolicyLossFn`` at ``importance_sampling_level=level`` (``token`` adds the dual clip)."""

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        if config is None:
            raise ValueError("medix_fast's veRL policy losses need the actor config (clip ratios, global_batch_info)")
        low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
        high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
        dual = config.get("clip_ratio_c", 3.0) if level == "token" else None
        opts, scale = aggregation(loss_agg_mode, response_mask, **(getattr(config, "global_batch_info", None) or {}))
        adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights  # (B, T)
        loss, m = policy_loss(log_prob, old_log_prob, adv, response_mask, importance_sampling_level=level,
                              epsilon_low=low, epsilon_high=high, clip_ratio_c=dual, log_ratio_clamp=20.0,
                              kl_clamp=10.0, **opts)  # veRL's clamps (no KL here: veRL adds its own)
        with torch.no_grad():
            mask = response_mask.float()
            approx_kl = (old_log_prob.float() - log_prob.float()).clamp(-20.0, 20.0)  # (B, T)
            metrics = {"actor/pg_clipfrac": m["clip_low"] + m["clip_high"],
                       "actor/ppo_kl": (approx_kl * mask).sum() / mask.sum().clamp(min=1.0),
                       "actor/pg_clipfrac_lower": m["clip_dual"]}
        return loss * scale, metrics

    loss_fn.__name__ = f"medix_policy_loss_{level}"
    return loss_fn


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """veRL's fused kernel signature: ``(log-probs, entropy)`` of ``labels`` under
    ``softmax(hidden @ weight.T / temperature)``, fp32, flattened to (N,) (``reduction`` "sum" or
    "mean" reduces the log-probs to a scalar; the entropy stays per token). Differentiable in
    ``hidden`` and ``weight`` through both outputs; never builds the (N, V) logits."""
    if dist_process_group is not None:
        raise ValueError("medix_fast's linear_cross_entropy does not split the vocabulary across ranks "
                         "(dist_process_group): use veRL's kernel for a vocabulary-parallel head")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    logp, entropy = fused_linear_logprobs(h, weight, labels.reshape(-1), temperature=float(temperature),
                                          return_entropy=True)  # each (N,)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy
