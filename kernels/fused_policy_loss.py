"""The policy loss straight from hidden states and the LM head: only valid tokens touch the head.

    loss, metrics = fused_linear_policy_loss(hidden, lm_head.weight, targets, mask, advantages,
                                             old_logprobs, loss_type="dapo", epsilon_high=0.28)

The valid (mask = 1) tokens are gathered first, so padding never goes through the (V, H) GEMMs.

Token-level importance sampling (GRPO, DAPO, Dr. GRPO), with gradients wanted: one pass. For each
chunk of tokens the fp32 logits are built (one GEMM), a row kernel takes the log-prob, logsumexp and
entropy, the per-token loss gradient is taken (it depends on that token alone, the aggregation
being a fixed per-token weight), a second row kernel turns the logits into dL/dlogits in place, and
two GEMMs give dL/dhidden and dL/dW, kept for the backward: 6·n·H·V FLOPs in all, peak extra
memory O(chunk × V). Sequence levels (GSPO) couple the tokens of a sequence, so they take the
two-pass path: :func:`fused_linear_logprobs` (no logits, recompute in backward, 8·n·H·V) then
:func:`policy_loss`, which is also the path when no gradient is needed.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton
from .logits_rows import row_grad, row_stats
from .logprobs import HeadGrads, chunk_logits, chunk_rows, fused_linear_logprobs
from .policy_loss import aggregation_weights, per_token_loss, policy_loss, prepare


class _TokenLevelPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, weights, old, adv, ref, sampling, inv_temp, o, chunk, triton_rows):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)  # (n,)
        entropy = torch.empty_like(logp)  # (n,)
        grads = HeadGrads(h, w, ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        take = lambda x, sl: None if x is None else x[sl][None]  # noqa: E731  (n,) -> (1, c)
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            z = chunk_logits(h[sl], w, b, inv_temp)  # (c, V) fp32
            lp, lse, ent = row_stats(z, targets[sl], triton_rows)  # each (c,)
            logp[sl], entropy[sl] = lp, ent
            with torch.enable_grad():
                lp_leaf = lp.detach().requires_grad_()
                ent_leaf = ent.detach().requires_grad_()
                old_c = lp_leaf.detach()[None] if old is None else take(old, sl)
                loss_t, *_ = per_token_loss(lp_leaf[None], old_c, adv[sl][None], weights[sl][None], o,
                                            ref=take(ref, sl), entropy=ent_leaf[None], sampling=take(sampling, sl))
                part = (loss_t[0] * weights[sl]).sum()
                g_lp, g_ent = torch.autograd.grad(part, (lp_leaf, ent_leaf), allow_unused=True)
            total += part.detach()
            dz = row_grad(z, targets[sl], lse, ent, g_lp, g_ent, inv_temp, w.dtype, triton_rows)  # (c, V)
            grads.add(dz, h, w, sl)
            del z, dz  # before the next chunk's logits exist: one (chunk, V) buffer at a time
        ctx.grads = grads.result(w, b)
        ctx.mark_non_differentiable(logp, entropy)
        return total, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_entropy):
        grads = tuple(None if g is None else g * g_loss.to(g.dtype) for g in ctx.grads)
        return (*grads, *([None] * 10))


def fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logprobs=None,
                             ref_logprobs=None, *, bias=None, temperature=1.0, sampling_logprobs=None,
                             compute_entropy=True, chunk_size=None, **opts):
    """Policy loss of :func:`policy_loss` computed from ``hidden`` (B, T, H) and ``weight`` (V, H).

    Args:
        hidden: (B, T, H) final hidden states at the positions that predict ``targets``.
        weight: (V, H) LM-head weight (cast to ``hidden``'s dtype); ``bias`` optional (V,).
        targets: (B, T) the sampled completion tokens; mask: (B, T) 1 where they count.
        advantages: (B,) or (B, T); old_logprobs / ref_logprobs / sampling_logprobs: (B, T) or None.
        temperature: the sampling temperature the log-probs are taken at.
        compute_entropy: report the mean entropy in metrics (free on the one-pass path).
        chunk_size: tokens per (chunk, V) logits buffer (see :func:`fused_linear_logprobs`).
        **opts: :class:`LossOptions` fields.

    Returns:
        (loss, metrics) as :func:`policy_loss`.
    """
    o, old, adv, maskf, ref, _, sampling = prepare(targets, old_logprobs, advantages, mask, ref_logprobs,
                                                   None, sampling_logprobs, opts, lead_name="targets",
                                                   computes_entropy=True)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(targets.shape):
        raise ValueError(f"hidden must be (B, T, H) with (B, T) = targets' {tuple(targets.shape)}, "
                         f"got {tuple(hidden.shape)}")
    batch, length, width = hidden.shape
    keep = maskf.reshape(-1).nonzero().squeeze(1)  # (n,) valid token positions

    def valid(x):  # (B, T) -> (n,)
        return None if x is None else x.expand(batch, length).reshape(-1).index_select(0, keep)

    def scatter(x):  # (n,) -> (B, T), zeros at padding
        return x.new_zeros(batch * length).index_copy(0, keep, x).view(batch, length)

    h = hidden.reshape(-1, width).index_select(0, keep)  # (n, H)
    t = valid(targets)
    params = [x for x in (hidden, weight, bias) if x is not None]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params) and o.importance_sampling_level == "token":
        w = weight.to(h.dtype).contiguous()
        b = None if bias is None else bias.to(h.dtype)
        chunk = chunk_rows(max(1, h.shape[0]), w.shape[0], chunk_size, h.device)
        loss, logp, ent = _TokenLevelPolicyLoss.apply(
            h.contiguous(), w, b, t.contiguous(), valid(aggregation_weights(maskf, o)), valid(old), valid(adv),
            valid(ref), valid(sampling), 1.0 / float(temperature), o, chunk, use_triton(h))
        with torch.no_grad():
            _, metrics = policy_loss(scatter(logp), old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                     entropy=scatter(ent), sampling_logprobs=sampling_logprobs, **opts)
        return loss, metrics
    want_entropy = compute_entropy or o.entropy_coef != 0
    out = fused_linear_logprobs(h, weight, t, bias=bias, temperature=temperature,
                                return_entropy=want_entropy, chunk_size=chunk_size)
    logp, ent = out if want_entropy else (out, None)
    if ent is not None:
        ent = scatter(ent if o.entropy_coef != 0 else ent.detach())
    return policy_loss(scatter(logp), old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=ent,
                       sampling_logprobs=sampling_logprobs, **opts)
