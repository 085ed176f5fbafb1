"""Row-wise softmax statistics and logit gradients over a materialised fp32 logits chunk.

The chunked paths hold at most (chunk, V) logits at a time. For each row (token):

    stats:     lse = logsumexp(z),  logp = z[target] - lse,  entropy = sum_v p_v (lse - z_v)
    gradient:  dz = (g_lp * (onehot(target) - p) - g_ent * p * (log p + entropy)) * inv_temp

The entropy is accumulated as log(sum e^(z-m)) - sum p (z-m), two non-negative terms, so large
logits (a near one-hot distribution) do not cancel it into negative values.

(``z`` already divided by the temperature, ``inv_temp`` the chain rule back to the raw logits;
with a soft-cap ``z = c tanh(raw / c) / T`` the chain rule also takes 1 - tanh^2 = 1 - (z T / c)^2,
read from ``z`` itself, so no raw logits are kept).
The Triton kernels stream each row once per pass in ``BLOCK_V`` tiles, in fp32, and write the
gradient in the dtype of the output buffer (in place over ``z`` when it is fp32); the torch
functions are the CPU path and the reference. Row offsets are 64-bit (``row * stride``).
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
    in_vocab = (tgt >= 0) & (tgt < vocab)  # an id out of range reads nothing and gives NaN
    tl.store(logp_ptr + row, tl.load(base + tgt, mask=in_vocab, other=float("nan")) - lse)
    tl.store(ent_ptr + row, tl.log(s) - pz / s)


@triton.jit
def _row_grad_kernel(z_ptr, out_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, vocab, stride, inv_temp,
                     inv_bound, HAS_GENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
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
        if HAS_SOFTCAP:  # z * inv_bound = tanh(raw / c)
            dz *= 1.0 - (z * inv_bound) * (z * inv_bound)
        tl.store(out_ptr + offset + v0 + cols, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=inside)


SCRATCH_MB = 16


GPU_BLOCK_V = 4096  # the row kernels' tile on the GPU (the tests also run it under the interpreter)


def gpu_block_v(vocab: int) -> int:
    return min(GPU_BLOCK_V, triton.next_power_of_2(vocab))


def _block_v(vocab: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # numpy runs each tile: smaller ones
        return min(1024, triton.next_power_of_2(vocab))
    return gpu_block_v(vocab)


def _row_blocks(n: int, vocab: int) -> list[slice]:
    """Row blocks of at most ``SCRATCH_MB`` of fp32 (the torch path's per-block temporaries)."""
    rows = max(1, (SCRATCH_MB << 20) // (4 * vocab))
    return [slice(i, i + rows) for i in range(0, n, rows)]


def row_stats(z: torch.Tensor, targets: torch.Tensor, triton_path: bool, entropy: bool = True,
              overwrite: bool = False):
    """(logp, lse, entropy), each (n,) fp32, of the fp32 logits ``z`` (n, V).

    The torch path works in row blocks with one block-sized temporary (none with ``overwrite``:
    ``z`` is then clobbered); without ``entropy`` it returns zeros for it and skips that pass."""
    if not triton_path:
        logp, lse, ent = torch.zeros(3, z.shape[0], dtype=torch.float32, device=z.device)
        for sl in _row_blocks(*z.shape):
            zb = z[sl]  # (r, V)
            top = zb.amax(dim=-1, keepdim=True)  # (r, 1)
            z_t = zb.gather(1, targets[sl, None]).squeeze(1)  # (r,)
            p = zb.sub_(top) if overwrite else torch.sub(zb, top)  # (r, V) z - m <= 0
            total = p.exp_().sum(-1)  # (r,) >= 1; p now holds e^(z - m)
            log_total = torch.log(total)
            lse[sl] = top.squeeze(1) + log_total
            logp[sl] = z_t - lse[sl]
            if entropy:  # log(total) + sum_v -e^(z-m) (z-m) / total, two non-negative terms
                ent[sl] = log_total + torch.special.entr(p, out=p).sum(-1) / total
        return logp, lse, ent
    n, vocab = z.shape
    lse, logp, ent = torch.empty(3, n, dtype=torch.float32, device=z.device)
    _row_stats_kernel[(n,)](z, targets, lse, logp, ent, vocab, z.stride(0), BLOCK_V=_block_v(vocab))
    return logp, lse, ent


def row_grad(z, targets, lse, entropy, g_lp, g_ent, inv_temp, out_dtype, triton_path: bool, softcap=None):
    """dL/d(raw logits) (n, V): the Triton kernel writes it in ``out_dtype`` (the cast fused into
    its one pass; in place over ``z`` when fp32), the torch path in fp32 in place over ``z``.
    ``softcap``: ``z`` is ``c tanh(raw / c) * inv_temp`` (see the module docstring)."""
    inv_bound = 1.0 if softcap is None else 1.0 / (softcap * inv_temp)  # z * inv_bound = tanh(raw / c)
    if not triton_path:
        for sl in _row_blocks(*z.shape):  # dz = -p * coef, in place of z
            dcap = None if softcap is None else torch.mul(z[sl], inv_bound).square_().neg_().add_(1)  # (r, V)
            log_p = z[sl].sub_(lse[sl, None])  # (r, V)
            coef = (g_lp[sl] * inv_temp)[:, None]  # (r, 1)
            if g_ent is not None:  # -p (g_lp + g_ent (log p + entropy))
                coef = torch.mul(log_p, (g_ent[sl] * inv_temp)[:, None]).add_(
                    ((g_lp[sl] + g_ent[sl] * entropy[sl]) * inv_temp)[:, None])  # (r, V)
            log_p.exp_().mul_(coef).neg_()
            if dcap is not None:  # the target's term first: the cap's factor multiplies all of dz
                log_p.scatter_add_(1, targets[sl, None], (g_lp[sl] * inv_temp)[:, None]).mul_(dcap)
        return z if softcap is not None else z.scatter_add_(1, targets[:, None], (g_lp * inv_temp)[:, None])
    n, vocab = z.shape
    out = z if out_dtype == torch.float32 else torch.empty(n, vocab, dtype=out_dtype, device=z.device)
    _row_grad_kernel[(n,)](z, out, targets, lse, entropy, g_lp, g_ent if g_ent is not None else g_lp,
                           vocab, z.stride(0), inv_temp, inv_bound, HAS_GENT=g_ent is not None,
                           HAS_SOFTCAP=softcap is not None, BLOCK_V=_block_v(vocab))
    return out
