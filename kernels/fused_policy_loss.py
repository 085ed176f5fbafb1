"""The policy loss straight from hidden states and the LM head: only valid tokens touch the head.

    loss, metrics = fused_linear_policy_loss(hidden, lm_head.weight, targets, mask, advantages,
                                             old_logprobs, loss_type="dapo", epsilon_high=0.28)

The valid (mask = 1) tokens are gathered first, so padding never goes through the (V, H) GEMMs;
their log-probs and entropies come from :func:`fused_linear_logprobs` (no (tokens, V) logits,
Triton on CUDA, chunked torch on CPU), are scattered back to (B, T) and fed to
:func:`policy_loss`, so every option of that function works here too, all together.
"""
from __future__ import annotations

import torch

from .logprobs import fused_linear_logprobs
from .policy_loss import LossOptions, policy_loss


def fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logprobs=None,
                             ref_logprobs=None, *, bias=None, temperature=1.0, sampling_logprobs=None,
                             compute_entropy=True, chunk_size=None, **opts):
    """Policy loss of :func:`policy_loss` computed from ``hidden`` (B, T, H) and ``weight`` (V, H).

    Args:
        hidden: (B, T, H) final hidden states at the positions that predict ``targets``.
        weight: (V, H) LM-head weight; ``bias`` optional (V,).
        targets: (B, T) the sampled completion tokens; mask: (B, T) 1 where they count.
        advantages: (B,) or (B, T); old_logprobs / ref_logprobs / sampling_logprobs: (B, T) or None.
        temperature: the sampling temperature the log-probs are taken at.
        compute_entropy: also compute per-token entropy (reported in metrics; differentiable
            when ``entropy_coef`` is set). Costs no extra GEMM.
        chunk_size: tokens per chunk of the backward's gradient buffer (see fused_linear_logprobs).
        **opts: :class:`LossOptions` fields.

    Returns:
        (loss, metrics) as :func:`policy_loss`.
    """
    o = LossOptions.from_kwargs(opts)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]) or tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must both be "
                         f"(B, T) = {tuple(hidden.shape[:2])}")
    batch, length, width = hidden.shape
    keep = mask.reshape(-1).nonzero().squeeze(1)  # (n_valid,)
    want_entropy = compute_entropy or o.entropy_coef != 0
    out = fused_linear_logprobs(hidden.reshape(-1, width).index_select(0, keep),  # (n_valid, H)
                                weight, targets.reshape(-1).index_select(0, keep), bias=bias,
                                temperature=temperature, return_entropy=want_entropy,
                                chunk_size=chunk_size)
    logp_valid, ent_valid = out if want_entropy else (out, None)

    def scatter(x):  # (n_valid,) -> (B, T), zeros at padding
        return x.new_zeros(batch * length).index_copy(0, keep, x).view(batch, length)

    logp = scatter(logp_valid)  # (B, T)
    entropy = None
    if ent_valid is not None:
        entropy = scatter(ent_valid if o.entropy_coef != 0 else ent_valid.detach())  # (B, T)
    return policy_loss(logp, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=entropy,
                       sampling_logprobs=sampling_logprobs, **opts)
