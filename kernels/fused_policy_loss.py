"""The policy loss straight from hidden states and the LM head: only valid tokens touch the head.

    loss, metrics = fused_linear_policy_loss(hidden, lm_head.weight, targets, mask, advantages,
                                             old_logprobs, loss_type="dapo", epsilon_high=0.28,
                                             valid_lengths=lengths)   # lengths: a host list, no sync

The valid (mask != 0) tokens are gathered first, so padding never goes through the (V, H) GEMMs.

With gradients wanted, one pass: for each chunk of tokens the fp32 logits are built (one GEMM), a
row kernel takes the log-prob, logsumexp and entropy, the loss gradient with respect to those
log-probs and entropies is taken on the chunk alone (and the chunk's metric sums added up), a
second row kernel turns the logits into dL/dlogits in place, and two GEMMs give dL/dhidden and
dL/dW, kept for the backward: 6·n·H·V FLOPs in all, peak extra memory O(chunk × V). That works
because a chunk holds all a token's loss depends on: at token level (GRPO, DAPO, Dr. GRPO) the
token itself (the aggregation is a fixed per-token weight), so chunks cut anywhere; at the sequence
levels (GSPO, GSPO-token) its whole sequence (the ratio is a sequence mean), so chunks are whole
sequences, packed (k rows, longest) for the loss. A sequence longer than a chunk takes the two-pass
path, :func:`fused_linear_logprobs` (no logits, recompute in backward, 8·n·H·V) then
:func:`policy_loss`, which is also the path without gradients.

Host syncs: the chunk layout needs the number of valid tokens per row on the host. A caller that
built the mask knows it and passes ``valid_lengths``: the call then makes no host-device sync (the
valid tokens are gathered with ``nonzero_static``, grid positions by index arithmetic on the
device). Without it, one read of the mask's row sums (a sync) supplies the lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import backend_for, debug_checks
from .logits_rows import row_grad, row_stats
from .logprobs import (HeadConfig, HeadGrads, cast, check_softcap, check_targets, chunk_logits, chunk_rows,
                       compute_dtype, fused_linear_logprobs, no_autocast)
from .loss_specs import LOSS_SPECS
from .policy_loss import (aggregation_weights, entropy_keep, entropy_weights, metric_sums, metrics_from_sums,
                          per_token_loss, policy_loss, prepare, weighted_loss)


@dataclass
class _Chunk:
    """Tokens ``tokens`` of the valid-token order, laid out on a (k, width) grid for the loss:
    one row in token order (``rows`` None), or grid row ``rows[j]``, column ``cols[j]`` for token j."""
    tokens: slice
    shape: tuple[int, int]
    rows: torch.Tensor | None = None  # (c,)
    cols: torch.Tensor | None = None  # (c,)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(c,) values of this chunk's tokens -> its (k, width) grid, zeros elsewhere (differentiable)."""
        if self.rows is None:
            return x.view(self.shape)
        return x.new_zeros(self.shape).index_put((self.rows, self.cols), x)

    def pack(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(n,) per valid token -> this chunk's grid (None stays None)."""
        return None if x is None else self.grid(x[self.tokens])


def _layout(lengths: list[int], chunk: int, whole_rows: bool, row_of, rank) -> list[_Chunk] | None:
    """Chunks of at most ``chunk`` valid tokens over rows of ``lengths`` valid tokens: cut anywhere,
    or with ``whole_rows`` as many consecutive whole rows as fit (None when a row is longer than
    ``chunk``), their tokens at grid (row_of - first row, rank). Host arithmetic on ``lengths``."""
    n = sum(lengths)
    if not whole_rows:
        return [_Chunk(slice(i, min(i + chunk, n)), (1, min(chunk, n - i))) for i in range(0, n, chunk)]
    if max(lengths, default=0) > chunk:
        return None
    groups, first, count = [], 0, 0  # (first row, end row, valid tokens)
    for r, length in enumerate(lengths):
        if count + length > chunk:
            groups.append((first, r, count))
            first, count = r, 0
        count += length
    groups.append((first, len(lengths), count))
    out, start = [], 0
    for first, end, count in groups:
        if count:  # rows without a valid token only pad a grid
            tokens = slice(start, start + count)
            out.append(_Chunk(tokens, (end - first, max(lengths[first:end])), row_of[tokens] - first, rank[tokens]))
            start += count
    return out


def _valid_lengths(maskf: torch.Tensor, valid_lengths) -> list[int]:
    """Valid tokens per row on the host: the caller's hint (checked against the mask only with
    ``MEDIX_FAST_DEBUG=1``), else read from the mask (the one sync of a call without the hint)."""
    if valid_lengths is None:
        return (maskf != 0).sum(-1).tolist()
    lengths = [int(x) for x in valid_lengths]
    if len(lengths) != maskf.shape[0] or min(lengths, default=0) < 0:
        raise ValueError(f"valid_lengths must give one count >= 0 per row of mask ({maskf.shape[0]} rows), "
                         f"got {lengths}")
    if debug_checks():
        actual = (maskf != 0).sum(-1).tolist()
        bad = [i for i, (a, b) in enumerate(zip(actual, lengths)) if a != b]
        if bad:
            raise ValueError(f"valid_lengths[{bad[0]}] = {lengths[bad[0]]} but mask row {bad[0]} has "
                             f"{actual[bad[0]]} valid tokens")
    return lengths


class _OnePassPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, per_token, layout, o, cfg):
        """Loss (0-dim), log-probs and entropies (n,) and the metric sums (6,) of the valid tokens;
        ``per_token``: (aggregation weights, entropy weights, keep, mask, old, adv, ref, sampling),
        each (n,) or None."""
        weights, ent_weights, keep, mask, old, adv, ref, sampling = per_token
        dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        with no_autocast(hidden):
            h, w, b = cast((hidden, weight, bias), cfg.dtype)
            n = h.shape[0]
            logp = torch.empty(n, dtype=torch.float32, device=h.device)  # (n,)
            entropy = torch.empty_like(logp)  # (n,)
            grads = HeadGrads(h, w, ctx.needs_input_grad[:3])
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            sums = torch.zeros(6, dtype=torch.float32, device=h.device)  # metric_sums
            for c in layout:
                sl = c.tokens
                z = chunk_logits(h[sl], w, b, cfg.inv_temp, cfg.softcap)  # (c, V) fp32
                lp, lse, ent = row_stats(z, targets[sl], cfg.triton_path)  # each (c,)
                logp[sl], entropy[sl] = lp, ent
                with torch.enable_grad():
                    lp_leaf = lp.detach().requires_grad_()
                    ent_leaf = ent.detach().requires_grad_()
                    lp_grid, ent_grid, adv_grid, mask_grid = c.grid(lp_leaf), c.grid(ent_leaf), c.pack(adv), c.pack(mask)
                    loss_t, ratio, dual, kl = per_token_loss(
                        lp_grid, c.grid(lp.detach()) if old is None else c.pack(old), adv_grid, mask_grid, o,
                        ref=c.pack(ref), sampling=c.pack(sampling), keep=c.pack(keep))  # (k, width)
                    part = weighted_loss(loss_t, ent_grid, c.pack(weights), c.pack(ent_weights), o)
                    g_lp, g_ent = torch.autograd.grad(part, (lp_leaf, ent_leaf), allow_unused=True)
                total += part.detach()
                sums += metric_sums(ratio, dual, kl, ent_grid, adv_grid, mask_grid, o)
                dz = row_grad(z, targets[sl], lse, ent, g_lp, g_ent, cfg.inv_temp, w.dtype, cfg.triton_path,
                              cfg.softcap)  # (c, V)
                grads.add(dz, h, w, sl)
                del z, dz  # before the next chunk's logits exist: one (chunk, V) buffer at a time
        ctx.grads = grads.result(dtypes)
        ctx.mark_non_differentiable(logp, entropy, sums)
        return total, logp, entropy, sums

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_entropy, _g_sums):
        grads = tuple(None if g is None else g * g_loss.to(g.dtype) for g in ctx.grads)
        return (*grads, *([None] * 5))  # targets, per_token, layout, o, cfg


def fused_linear_policy_loss(hidden, weight, targets, mask, advantages, old_logprobs=None,
                             ref_logprobs=None, *, bias=None, temperature=1.0, sampling_logprobs=None,
                             compute_entropy=True, chunk_size=None, valid_lengths=None, fp32_precision="tf32",
                             softcap=None, **opts):
    """Policy loss of :func:`policy_loss` computed from ``hidden`` (B, T, H) and ``weight`` (V, H).

    Args:
        hidden: (B, T, H) final hidden states at the positions that predict ``targets``.
        weight: (V, H) LM-head weight; ``bias`` optional (V,). Compute dtype, autocast and
            gradient dtypes as :func:`fused_linear_logprobs`.
        targets: (B, T) the sampled completion tokens; mask: (B, T) 1 where they count.
        advantages: (B,) or (B, T); old_logprobs / ref_logprobs / sampling_logprobs: (B, T) or None.
        temperature: the sampling temperature the log-probs are taken at.
        compute_entropy: report the mean entropy in metrics (free on the one-pass path).
        chunk_size: tokens per (chunk, V) logits buffer (see :func:`fused_linear_logprobs`).
        valid_lengths: optional host sequence of B ints, the number of mask != 0 tokens in each
            row (any positions); with it the call makes no host-device sync. Checked against the
            mask only with ``MEDIX_FAST_DEBUG=1``.
        fp32_precision, softcap: see :func:`fused_linear_logprobs`.
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
    check_targets(targets, weight.shape[0])
    check_softcap(softcap)
    lengths = _valid_lengths(maskf, valid_lengths)
    keep = maskf.reshape(-1).nonzero_static(size=sum(lengths)).squeeze(1)  # (n,) valid token positions

    def valid(x):  # (B, T) -> (n,)
        return None if x is None else x.expand(batch, length).reshape(-1).index_select(0, keep)

    def scatter(x):  # (n,) -> (B, T), zeros at padding
        return x.new_zeros(batch * length).index_copy(0, keep, x).view(batch, length)

    h = hidden.reshape(-1, width).index_select(0, keep)  # (n, H)
    t = valid(targets)
    params = [x for x in (hidden, weight, bias) if x is not None]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        cfg = HeadConfig(compute_dtype(hidden), 1.0 / float(temperature),
                         chunk_rows(max(1, h.shape[0]), weight.shape[0], chunk_size, h.device),
                         backend_for("fused_linear_policy_loss", h) == "triton", fp32_precision,
                         None if softcap is None else float(softcap))
        whole_rows = (o.importance_sampling_level != "token" or LOSS_SPECS[o.loss_type].whole_rows
                      or o.off_policy_mask_threshold is not None)  # a sequence's terms in one chunk
        row_of = rank = None
        if whole_rows:
            row_of = torch.div(keep, length, rounding_mode="floor")  # (n,) batch row of each valid token
            rank = (maskf != 0).cumsum(-1).reshape(-1).index_select(0, keep) - 1  # (n,) its place in the row
        layout = _layout(lengths, cfg.chunk, whole_rows, row_of, rank)
        if layout is not None:
            top = None  # (B, T) the top_entropy_quantile mask
            if o.top_entropy_quantile < 1:  # the one extra pass: every entropy before the loss pass
                with torch.no_grad():
                    _, ent = fused_linear_logprobs(h, weight, t, bias=bias, temperature=temperature,
                                                   return_entropy=True, chunk_size=chunk_size,
                                                   fp32_precision=fp32_precision, softcap=softcap)  # (n,)
                top = entropy_keep(scatter(ent), maskf, o)
            weights = aggregation_weights(maskf, o)
            per_token = tuple(valid(x) for x in (weights, entropy_weights(maskf, top, o, weights), top, maskf, old,
                                                 adv, ref, sampling))
            w = weight if weight.stride(-1) == 1 else weight.contiguous()
            loss, _, _, sums = _OnePassPolicyLoss.apply(
                h, w, None if bias is None else bias.contiguous(), t.contiguous(), per_token, layout, o, cfg)
            return loss, metrics_from_sums(sums, maskf.sum())
    want_entropy = compute_entropy or o.entropy_coef != 0 or o.top_entropy_quantile < 1
    out = fused_linear_logprobs(h, weight, t, bias=bias, temperature=temperature, return_entropy=want_entropy,
                                chunk_size=chunk_size, fp32_precision=fp32_precision, softcap=softcap)
    logp, ent = out if want_entropy else (out, None)
    if ent is not None:
        ent = scatter(ent if o.entropy_coef != 0 else ent.detach())
    return policy_loss(scatter(logp), old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=ent,
                       sampling_logprobs=sampling_logprobs, **opts)
