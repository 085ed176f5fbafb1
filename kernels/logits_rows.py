"""Row-wise softmax statistics and logit gradients over a materialised fp32 logits chunk.

The chunked paths hold at most (chunk, V) logits at a time. For each row (token):

    stats:     lse = logsumexp(z),  logp = z[target] - lse,  entropy = sum_v p_v (lse - z_v)
    gradient:  dz = (g_lp * (onehot(target) - p) - g_ent * p * (log p + entropy)) * inv_temp

The entropy is accumulated as log(sum e^(z-m)) - sum p (z-m), two non-negative terms, so large
logits (a near one-hot distribution) do not cancel it into negative values.

(``z`` already divided by the temperature, ``inv_temp`` the chain rule back to the raw logits).
The Triton kernels stream each row once per pass in ``BLOCK_V`` tiles, in fp32, and write the
gradient in the dtype of the output buffer (in place over ``z`` when it is fp32); the torch
functions are the CPU path and the reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(z_ptr, tgt_ptr, lse_ptr, logp_ptr, ent_ptr, vocab, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride
    tgt = tl.load(tgt_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)  # fp32 scalar 0
    pz = s
    m = s + float("-inf")
    for v0 in range(0, vocab, BLOCK_V):
        inside = v0 + cols < vocab
        z = tl.load(base + v0 + cols, mask=inside, other=float("-inf"))  # (BV,)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        shift = s * tl.where(s > 0, m - m_new, 0.0)
        pz = (pz + shift) * scale + tl.sum(e * tl.where(inside, z - m_new, 0.0), axis=0)  # <= 0
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.load(base + tgt) - lse)
    tl.store(ent_ptr + row, tl.log(s) - pz / s)


@triton.jit
def _row_grad_kernel(z_ptr, out_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, vocab, stride, inv_temp,
                     HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offset = row.to(tl.int64) * stride
    tgt = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(glp_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, vocab, BLOCK_V):
        inside = v0 + cols < vocab
        z = tl.load(z_ptr + offset + v0 + cols, mask=inside, other=0.0)  # (BV,)
        p = tl.exp(z - lse)
        coef = g_lp + tl.zeros((BLOCK_V,), tl.float32)
        if HAS_GENT:
            coef += tl.load(gent_ptr + row) * (z - lse + tl.load(ent_ptr + row))
        dz = tl.where(v0 + cols == tgt, g_lp, 0.0) - p * coef
        tl.store(out_ptr + offset + v0 + cols, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=inside)


def _block_v(vocab: int) -> int:
    cap = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return min(cap, triton.next_power_of_2(vocab))


def row_stats(z: torch.Tensor, targets: torch.Tensor, triton_path: bool, entropy: bool = True,
              overwrite: bool = False):
    """(logp, lse, entropy), each (n,) fp32, of the fp32 logits ``z`` (n, V).

    The torch path holds one (n, V) buffer beside ``z``, none with ``overwrite`` (``z`` is then
    clobbered); without ``entropy`` it returns zeros for it and skips that pass."""
    if not triton_path:
        top = z.amax(dim=-1, keepdim=True)  # (n, 1)
        logp = z.gather(1, targets[:, None]).sub_(top).squeeze(1)  # (n,) z_t - m, the lse comes next
        p = z.sub_(top) if overwrite else torch.sub(z, top)  # (n, V) z - m <= 0
        total = p.exp_().sum(-1)  # (n,) >= 1; p now holds e^(z - m)
        lse = top.squeeze(1) + torch.log(total)
        ent = torch.zeros_like(lse)
        if entropy:  # log(total) + sum_v -e^(z-m) (z-m) / total, two non-negative terms
            ent = torch.log(total) + torch.special.entr(p, out=p).sum(-1) / total
        return logp.sub_(torch.log(total)), lse, ent
    n, vocab = z.shape
    lse, logp, ent = torch.empty(3, n, dtype=torch.float32, device=z.device)
    _row_stats_kernel[(n,)](z, targets, lse, logp, ent, vocab, z.stride(0), BLOCK_V=_block_v(vocab))
    return logp, lse, ent


def row_grad(z, targets, lse, entropy, g_lp, g_ent, inv_temp, out_dtype, triton_path: bool):
    """dL/d(raw logits) (n, V) in ``out_dtype``; overwrites ``z`` (its buffer is reused)."""
    if not triton_path:
        log_p = z.sub_(lse[:, None])  # (n, V) in place of z
        coef = g_lp[:, None]
        if g_ent is not None:  # -p (g_lp + g_ent (log p + entropy))
            coef = torch.mul(log_p, g_ent[:, None]).add_((g_lp + g_ent * entropy)[:, None])  # (n, V)
        dz = log_p.exp_().mul_(coef).neg_()  # -p * coef, in place of z
        dz.scatter_add_(1, targets[:, None], g_lp[:, None])
        return dz.mul_(inv_temp).to(out_dtype)
    n, vocab = z.shape
    out = z if out_dtype == torch.float32 else torch.empty(n, vocab, dtype=out_dtype, device=z.device)
    _row_grad_kernel[(n,)](z, out, targets, lse, entropy, g_lp, g_ent if g_ent is not None else g_lp,
                           vocab, z.stride(0), inv_temp, HAS_GENT=g_ent is not None,
                           BLOCK_V=_block_v(vocab))
    return out
