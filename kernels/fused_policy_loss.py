"""The policy loss straight from hidden states and the LM head: only valid tokens touch the head.

    loss, metrics = fused_linear_policy_loss(hidden, lm_head.weight, targets, mask, advantages,
                                             old_logprobs, loss_type="dapo", epsilon_high=0.28)

The valid (mask != 0) tokens are gathered first, so padding never goes through the (V, H) GEMMs.

With gradients wanted, one pass: for each chunk of tokens the fp32 logits are built (one GEMM), a
row kernel takes the log-prob, logsumexp and entropy, the loss gradient with respect to those
log-probs and entropies is taken on the chunk alone, a second row kernel turns the logits into
dL/dlogits in place, and two GEMMs give dL/dhidden and dL/dW, kept for the backward: 6·n·H·V FLOPs
in all, peak extra memory O(chunk × V). That works because a chunk holds all a token's loss depends
on: at token level (GRPO, DAPO, Dr. GRPO) the token itself (the aggregation is a fixed per-token
weight), so chunks cut anywhere; at the sequence levels (GSPO, GSPO-token) its whole sequence (the
ratio is a sequence mean), so chunks are whole sequences, packed (k rows, longest) for the loss.
A sequence longer than a chunk takes the two-pass path, :func:`fused_linear_logprobs` (no logits,
recompute in backward, 8·n·H·V) then :func:`policy_loss`, which is also the path without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import use_triton
from .logits_rows import row_grad, row_stats
from .logprobs import HeadGrads, chunk_logits, chunk_rows, fused_linear_logprobs
from .policy_loss import aggregation_weights, per_token_loss, policy_loss, prepare


@dataclass
class _Chunk:
    """Tokens ``tokens`` of the valid-token order, packed into a (k, width) grid for the loss."""
    tokens: slice
    rows: torch.Tensor  # (c,) grid row of each token
    cols: torch.Tensor  # (c,) grid column
    shape: tuple[int, int]

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(c,) values of this chunk's tokens -> its (k, width) grid, zeros elsewhere (differentiable)."""
        return x.new_zeros(self.shape).index_put((self.rows, self.cols), x)

    def pack(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(n,) per valid token -> this chunk's grid (None stays None)."""
        return None if x is None else self.grid(x[self.tokens])


def _rows_chunk(start: int, sizes: list[int], device: torch.device) -> _Chunk:
    """Whole rows of ``sizes`` valid tokens from valid token ``start`` on, one grid row each."""
    counts = torch.tensor(sizes, device=device)  # (k,)
    rows = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)  # (c,)
    cols = torch.arange(sum(sizes), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return _Chunk(slice(start, start + sum(sizes)), rows, cols, (len(sizes), max(sizes)))


def _layout(lengths: list[int], chunk: int, whole_rows: bool, device: torch.device) -> list[_Chunk] | None:
    """Chunks of at most ``chunk`` tokens over rows of ``lengths`` valid tokens: with ``whole_rows``
    as many whole rows as fit (None when a row is longer than ``chunk``), else cut anywhere."""
    if not whole_rows:
        n = sum(lengths)
        return [_rows_chunk(i, [min(chunk, n - i)], device) for i in range(0, n, chunk)]
    lengths = [x for x in lengths if x]
    if lengths and max(lengths) > chunk:
        return None
    groups: list[list[int]] = [[]]
    for length in lengths:
        if sum(groups[-1]) + length > chunk:
            groups.append([])
        groups[-1].append(length)
    out, start = [], 0
    for g in groups:
        if g:  # empty only when no row has a valid token
            out.append(_rows_chunk(start, g, device))
            start += sum(g)
    return out


class _OnePassPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, weights, mask, old, adv, ref, sampling, layout, inv_temp, o, triton_rows):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)  # (n,)
        entropy = torch.empty_like(logp)  # (n,)
        grads = HeadGrads(h, w, ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for c in layout:
            sl = c.tokens
            z = chunk_logits(h[sl], w, b, inv_temp)  # (c, V) fp32
            lp, lse, ent = row_stats(z, targets[sl], triton_rows)  # each (c,)
            logp[sl], entropy[sl] = lp, ent
            with torch.enable_grad():
                lp_leaf = lp.detach().requires_grad_()
                ent_leaf = ent.detach().requires_grad_()
                loss_t, *_ = per_token_loss(c.grid(lp_leaf), c.grid(lp.detach()) if old is None else c.pack(old),
                                            c.pack(adv), c.pack(mask), o, ref=c.pack(ref), entropy=c.grid(ent_leaf),
                                            sampling=c.pack(sampling))  # (k, width)
                part = (loss_t * c.pack(weights)).sum()
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
        return (*grads, *([None] * 11))


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
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        w = weight.to(h.dtype).contiguous()
        chunk = chunk_rows(max(1, h.shape[0]), w.shape[0], chunk_size, h.device)
        lengths = (maskf != 0).sum(-1).tolist()  # valid tokens per row
        layout = _layout(lengths, chunk, o.importance_sampling_level != "token", h.device)
        if layout is not None:
            loss, logp, ent = _OnePassPolicyLoss.apply(
                h.contiguous(), w, None if bias is None else bias.to(h.dtype), t.contiguous(),
                valid(aggregation_weights(maskf, o)), valid(maskf), valid(old), valid(adv), valid(ref), valid(sampling),
                layout, 1.0 / float(temperature), o, use_triton(h))
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
