"""Batch-invariant arithmetic: results that depend on a row's own values only, never on which other
rows share the call, how many there are, or where the row sits. ``sampling.exact`` runs the
sampler and the trainer through these, so their bf16 log-probs agree bit for bit
(docs/mismatch.md#exact-mode).

    y = linear(x, w, b)                        # (..., N): every row through a fixed-shape GEMM
    o = attention(q, k, v, seen, scale)        # (S, Tq, H, D): per query, keys in position order
    z = head_logits(h, w, b)                   # (n, V) fp32 logits, fixed-shape GEMMs
    lp = token_logprobs(z, targets, inv_temp)  # (n,) fp32 log softmax(z * inv_temp)[target]

How each one is made invariant:
- GEMMs (``linear``, ``head_logits``): the rows go through ``torch.mm`` in tiles of exactly
  ``TILE`` rows (the last one zero-padded), so the BLAS sees one shape whatever the batch; a
  GEMM computes each row of a call alike (oneDNN / MKL pick kernels, blocking and K order by
  shape: M = 1 and M = T take different ones, which is what differs without this).
- Sums (``fold``): zero-padded to a power of two and folded in halves by element-wise adds, so
  the order is fixed by construction and extra zero padding changes nothing (x + 0 = x): a sum
  over a query's keys is the same in a 40-key decode table and a 100-column training row.
- Attention: each (query, head) over its keys in position order, K/V (and q) rounded to the
  compute dtype first, as the sampler's pool holds them. On the C++ op (``csrc/exact_attention.cpp``,
  the CPU default) every sum runs sequentially, one query at a time; in PyTorch (no compiler, or
  ``force_backend("torch")``) scores are a fold over the head dimension, the softmax a max (exact)
  and a fold over the keys, the output a fold of the weighted values. Both sides of a run take the
  same one (``dispatch.use_cpp``). The backward recomputes the maths with autograd in fp32:
  gradients are not required to be invariant.
"""
from __future__ import annotations

import torch

from . import cpp, dispatch

TILE = 16  # rows per GEMM call
CHUNK = 1 << 24  # elements of the (.., queries, keys, D) products materialised at once


def fold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` in a fixed pairwise order (see the module docstring); ``dim`` removed."""
    n = x.shape[dim]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        pad = list(x.shape)
        pad[dim] = width - n
        x = torch.cat([x, x.new_zeros(pad)], dim)
    while width > 1:
        width //= 2
        x = x.narrow(dim, 0, width) + x.narrow(dim, width, width)
    return x.squeeze(dim)


def _rows(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(n, K) @ (K, N) (+ b) in tiles of ``TILE`` rows -> (n, N), x's dtype."""
    n, k = x.shape
    xp = torch.cat([x, x.new_zeros(-n % TILE, k)]) if n % TILE else x.contiguous()  # (n', K)
    tiles = [torch.mm(t, w_t) if b is None else torch.addmm(b, t, w_t) for t in xp.split(TILE)]
    return torch.cat(tiles)[:n]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` batch-invariantly: operands in autocast's dtype when it is on (as ``F.linear``
    under autocast), rows in fixed-shape tiles. Differentiable (autograd of the tiles)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = _rows(x.reshape(-1, x.shape[-1]), weight.t(), bias)  # (n, N)
    return out.view(*x.shape[:-1], -1)


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits (n, V) of hidden rows (n, H) already in the head's compute dtype: operands upcast
    to fp32 (exact for bf16), fixed-shape fp32 GEMMs."""
    return _rows(h.float(), weight.float().t(), None if bias is None else bias.float())


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, inv_temp: float = 1.0) -> torch.Tensor:
    """log softmax(logits * inv_temp)[target] (n,) fp32 of logits (n, V): the max is exact, the
    sum of exponentials a ``fold``."""
    z = logits.float() * inv_temp  # (n, V)
    m = z.amax(-1, keepdim=True)  # (n, 1)
    lse = m[:, 0] + fold((z - m).exp(), -1).log()  # (n,)
    return z.gather(1, targets.view(-1, 1).long())[:, 0] - lse


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float) -> torch.Tensor:
    """The forward maths (see :func:`attention`), in chunks of queries."""
    s, tq, heads, dim = q.shape
    length, kv = k.shape[1], k.shape[2]
    r = heads // kv
    qf = q.float().view(s, tq, kv, r, dim).permute(0, 2, 3, 1, 4)  # (S, kv, r, Tq, D)
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]  # (S, kv, 1, L, D)
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]  # (S, kv, 1, L, D)
    keys = torch.arange(length, device=q.device)
    step = max(1, CHUNK // max(1, s * heads * length * dim))
    out = []
    for a in range(0, tq, step):
        qc = qf[:, :, :, a:a + step]  # (S, kv, r, c, D)
        scores = fold(qc[:, :, :, :, None] * kf[:, :, :, None], -1) * scale  # (S, kv, r, c, L)
        valid = keys < seen[:, a:a + step, None]  # (S, c, L)
        scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a query that sees nothing: p = 0
        p = (scores - m).exp()  # (S, kv, r, c, L)
        denom = fold(p, -1).clamp_min(torch.finfo(torch.float32).tiny)  # (S, kv, r, c)
        o = fold(p[..., None] * vf[:, :, :, None], -2) / denom[..., None]  # (S, kv, r, c, D)
        out.append(o)
    o = torch.cat(out, 3) if out else qf.new_zeros(s, kv, r, 0, dim)
    return o.permute(0, 3, 1, 2, 4).reshape(s, tq, heads, dim)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seen, scale):
        ctx.save_for_backward(q, k, v, seen)
        ctx.scale = scale
        if dispatch.use_cpp(q):
            return cpp.exact_attention(q, k, v, seen, scale)
        return _attention(q, k, v, seen, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, seen = ctx.saved_tensors
        with torch.enable_grad():
            qf, kf, vf = (t.detach().float().requires_grad_(t.requires_grad) for t in (q, k, v))
            s, tq, heads, dim = q.shape
            r = heads // k.shape[2]
            kh, vh = kf.repeat_interleave(r, 2), vf.repeat_interleave(r, 2)  # (S, L, H, D)
            scores = torch.einsum("sqhd,slhd->shql", qf, kh) * ctx.scale  # (S, H, Tq, L)
            valid = torch.arange(k.shape[1], device=q.device) < seen[:, None, :, None]  # (S, 1, Tq, L)
            p = scores.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)
            out = torch.einsum("shql,slhd->sqhd", p, vh)  # (S, Tq, H, D)
            inputs = [t for t in (qf, kf, vf) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, inputs, grad.float()))
        return (*(next(grads).to(t.dtype) if t.requires_grad else None for t in (q, k, v)), None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float) -> torch.Tensor:
    """q (S, Tq, H, D) of S sequences; k / v (S, L, kv, D) their keys and values in position order
    (key j at index j); ``seen`` (S, Tq) int: query t attends to keys [0, seen[s, t]) (causal:
    its position + 1; 0: a padding query, output 0). Returns (S, Tq, H, D) fp32. Callers round
    q, k and v to the compute dtype first (what the K/V pool holds)."""
    return _Attention.apply(q, k, v, seen, scale)
