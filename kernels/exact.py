"""Batch-invariant arithmetic: results that depend on a row's own values only, never on which other
rows share the call, how many there are, or where the row sits. ``sampling.exact`` runs the
sampler and the trainer through these, so their bf16 log-probs agree bit for bit
(docs/mismatch.md#exact-mode).

    y = linear(x, w, b)                        # (..., N): F.linear, batch-invariant
    o = attention(q, k, v, seen, scale)        # (S, Tq, H, D): per query, keys in position order
    z = head_logits(h, w, b)                   # (n, V) fp32 logits, batch-invariant
    lp = token_logprobs(z, targets, inv_temp)  # (n,) fp32 log softmax(z * inv_temp)[target]

How each one is made invariant:
- GEMMs (``linear``, ``head_logits``): the rows go through ``torch.mm`` in tiles of exactly
  ``TILE`` rows (the last one zero-padded), so the BLAS sees one shape whatever the batch; a
  GEMM computes each row of a call alike (oneDNN / MKL pick kernels, blocking and K order by
  shape: MKL's fp32 GEMM gives rows 1-15 of a call other bits than a large call does). Tiles cost
  one BLAS call per 16 rows, so where this machine's own GEMM already is invariant for a shape
  (probed once: rows alone and in batches of 1-2,048 rows, at several positions; oneDNN's bf16
  GEMM on an AVX512-BF16 CPU is) the plain call runs instead: ``plain_gemm_is_invariant``, the
  one place that chooses, and ``tiles_forced`` to override it. The tiled backward is plain GEMMs.
- Sums (``fold``): zero-padded to a power of two and folded in halves by element-wise adds, so
  the order is fixed by construction and extra zero padding changes nothing (x + 0 = x): a sum
  over a query's keys is the same in a 40-key decode table and a 100-column training row.
- Attention: each (query, head) over its keys in position order, K/V (and q) rounded to the
  compute dtype first, as the sampler's pool holds them. On the C++ op (``csrc/exact_attention.cpp``,
  the CPU default) every sum runs sequentially, one query at a time; in PyTorch (no compiler, or
  ``force_backend("torch")``) scores are a fold over the head dimension, the softmax a max (exact)
  and a fold over the keys, the output a fold of the weighted values. Both sides of a run take the
  same one (``dispatch.use_cpp``). The backward is SDPA's over the same keys in fp32 (a query that
  sees nothing passes no gradient): gradients are not required to be invariant.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import cpp, dispatch

TILE = 16  # rows per GEMM call of the tiled path (the decode's rows pad up to it)
PROBE_ROWS = 2048
PROBE_SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 2048)
_PROBED: dict[tuple, bool] = {}
_forced_tiles = False
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
    """(n, K) @ (K, N) (+ b) in tiles of ``TILE`` rows -> (n, N), x's dtype (no autograd)."""
    n, k = x.shape
    if n % TILE:
        x = torch.cat([x, x.new_zeros(-n % TILE, k)])  # (n', K)
    x = x.contiguous()
    out = x.new_empty(x.shape[0], w_t.shape[1])  # (n', N)
    for i in range(0, x.shape[0], TILE):
        if b is None:
            torch.mm(x[i:i + TILE], w_t, out=out[i:i + TILE])
        else:
            torch.addmm(b, x[i:i + TILE], w_t, out=out[i:i + TILE])
    return out[:n]


class _Linear(torch.autograd.Function):
    """Forward in tiles; backward by plain GEMMs (gradients are not required to be invariant)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias = bias is not None
        return _rows(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dw = grad.t() @ x if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def plain_gemm_is_invariant(dtype: torch.dtype, k: int, n: int, bias: bool, device: torch.device) -> bool:
    """Whether this machine's own GEMM (``F.linear``) of (rows, k) x (k, n) in ``dtype`` gave every row
    the same bits alone and in batches of 1 to ``PROBE_ROWS`` rows, first and last: probed
    once per shape, dtype and thread count (a few ms). The one place the fast path is chosen;
    :func:`tiles_forced` overrides it."""
    if _forced_tiles:
        return False
    key = (dtype, k, n, bias, device, torch.get_num_threads())
    if key not in _PROBED:
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(PROBE_ROWS, k, generator=g, device=device).to(dtype)
        w = torch.randn(n, k, generator=g, device=device).to(dtype)
        b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            full = F.linear(x, w, b)
            _PROBED[key] = all(torch.equal(F.linear(x[at:at + m], w, b), full[at:at + m])
                               for m in PROBE_SIZES for at in {0, PROBE_ROWS - m})
    return _PROBED[key]


@contextlib.contextmanager
def tiles_forced():
    """Every GEMM of this module in fixed-shape tiles, whatever :func:`plain_gemm_is_invariant` found."""
    global _forced_tiles
    before, _forced_tiles = _forced_tiles, True
    try:
        yield
    finally:
        _forced_tiles = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` batch-invariantly, in autocast's dtype when it is on: the plain call on rows made
    contiguous (autocast casts and caches the weights as usual) where the probe found it
    invariant, else tiles of operands cast here. Differentiable."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    rows = x.reshape(-1, x.shape[-1])  # (n, K)
    if plain_gemm_is_invariant(dtype, weight.shape[1], weight.shape[0], bias is not None, x.device):
        return F.linear(rows, weight, bias).view(*x.shape[:-1], -1)
    with torch.autocast(kind, enabled=False):
        out = _Linear.apply(rows.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))  # (n, N)
    return out.view(*x.shape[:-1], -1)


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits (n, V) of hidden rows (n, H) already in the head's compute dtype: operands upcast
    to fp32 (exact for bf16), then :func:`linear`."""
    with torch.autocast(h.device.type, enabled=False):
        return linear(h.float(), weight.float(), None if bias is None else bias.float())


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
        with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
            qf, kf, vf = (t.detach().float().requires_grad_(t.requires_grad) for t in (q, k, v))
            valid = torch.arange(k.shape[1], device=q.device) < seen.clamp_min(1)[:, None, :, None]  # (S, 1, Tq, L)
            out = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                                 attn_mask=valid, scale=ctx.scale, enable_gqa=True)  # (S, H, Tq, D)
            inputs = [t for t in (qf, kf, vf) if t.requires_grad]
            grad = grad.float().masked_fill((seen == 0)[..., None, None], 0)  # queries that see nothing: no gradient
            grads = iter(torch.autograd.grad(out, inputs, grad.transpose(1, 2)))
        return (*(next(grads).to(t.dtype) if t.requires_grad else None for t in (q, k, v)), None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float) -> torch.Tensor:
    """q (S, Tq, H, D) of S sequences; k / v (S, L, kv, D) their keys and values in position order
    (key j at index j); ``seen`` (S, Tq) int: query t attends to keys [0, seen[s, t]) (causal:
    its position + 1; 0: a padding query, output 0). Returns (S, Tq, H, D) fp32. Callers round
    q, k and v to the compute dtype first (what the K/V pool holds)."""
    return _Attention.apply(q, k, v, seen, scale)
