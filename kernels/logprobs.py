"""Log-probs (and entropy) straight from hidden states and the LM head, never building logits.

    logp[i]    = log softmax(h_i . W^T + b) / T)[targets_i]             fp32
    entropy[i] = -sum_v p_iv log p_iv  of the same tempered distribution   fp32

Forward, Triton path: one kernel computes logit tiles (BLOCK_M tokens x BLOCK_V vocab) with
``tl.dot`` and folds them into an online logsumexp, an online sum of p*z (for the entropy) and
the target logit, all in fp32 registers; the vocabulary is split across programs when the token
count alone cannot fill the GPU, and the splits are merged by a tiny torch epilogue.
Backward: for a chunk of tokens the fp32 logits are recomputed by one GEMM (cuBLAS, fp32 output),
a row kernel (``logits_rows.py``) turns them into dL/dlogits in the weight's dtype, and two GEMMs
give dL/dhidden and dL/dW. Peak extra memory is O(chunk x V), never O(tokens x V).

The torch path (CPU, and the reference the kernels are tested against) follows the same chunked
plan with the logits of one chunk materialised at a time.

Run ``python -m pytest tests/test_logprobs.py`` to check both paths against fp64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .logits_rows import row_grad, row_stats


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, inv_temp,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows] . W[cols]^T + b[cols]) * inv_temp in fp32; -inf outside the vocabulary."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + rows[:, None] * hidden + k[None, :],
                    mask=(rows[:, None] < n_rows) & (k[None, :] < hidden), other=0.0)  # (BM, BK)
        w = tl.load(w_ptr + cols[None, :] * hidden + k[:, None],
                    mask=(cols[None, :] < vocab) & (k[:, None] < hidden), other=0.0)  # (BK, BV)
        if IEEE:  # fp32 inputs (and the interpreter, whose bf16 dot is wrong): exact fp32 products
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < vocab, acc * inv_temp, float("-inf"))  # (BM, BV)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, max_ptr, sum_ptr, pz_ptr, zt_ptr,
                    n_rows, vocab, hidden, inv_temp, v_per_split,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (max m, sum e^(z-m), sum e^(z-m)(z-m), target logit) of a token block over a vocab split."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    split = tl.program_id(1)
    tgt = tl.load(tgt_ptr + rows, mask=rows < n_rows, other=-1)  # (BM,)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # (BV,)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, v_end, hidden, inv_temp,
                        HAS_BIAS, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)  # (BM, BV)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 outside the vocabulary
        # pz = sum e^(z-m) (z-m) <= 0, kept relative to the running max: entropy without cancellation
        shift = s * tl.where(s > 0, m - m_new, 0.0)
        pz = (pz + shift) * scale + tl.sum(e * tl.where(cols[None, :] < v_end, z - m_new[:, None], 0.0), axis=1)
        s = s * scale + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * n_rows + rows
    keep = rows < n_rows
    tl.store(max_ptr + out, m, mask=keep)
    tl.store(sum_ptr + out, s, mask=keep)
    tl.store(pz_ptr + out, pz, mask=keep)
    tl.store(zt_ptr + out, zt, mask=keep)


# ----------------------------------------------------------------------------- launchers
def _blocks(dtype: torch.dtype, vocab: int) -> tuple[int, int, int]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # numpy runs each tile: fewer, wider tiles at large V
        return 16, 64 if vocab <= 16384 else 1024, 32
    return (64, 128, 64) if dtype == torch.float32 else (128, 128, 64)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_stats(h, w, b, targets, inv_temp, entropy):
    """(logp, lse, entropy) per token, fp32, from the fused forward kernel (which always has the
    entropy: its two extra sums cost nothing beside the GEMM, so ``entropy`` is not needed)."""
    n, hidden = h.shape
    vocab = w.shape[0]
    bm, bv, bk = _blocks(h.dtype, vocab)
    row_blocks = triton.cdiv(n, bm)
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
    splits = max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(vocab, 4 * bv)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), bv) * bv
    splits = triton.cdiv(vocab, v_per_split)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=h.device)  # (4, S, n)
    _forward_kernel[(row_blocks, splits)](
        h, w, b if b is not None else h, targets, part[0], part[1], part[2], part[3],
        n, vocab, hidden, inv_temp, v_per_split,
        HAS_BIAS=b is not None, IEEE=_ieee(h.dtype), BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
        num_warps=8 if bm * bv >= 128 * 128 else 4, num_stages=3,
    )
    m, s, pz, zt = part.unbind(0)  # each (S, n)
    top = m.max(dim=0).values  # (n,)
    scale = torch.exp(m - top)  # (S, n)
    total = (s * scale).sum(0)  # (n,)
    lse = top + torch.log(total)
    centred = ((pz + s * (m - top)) * scale).sum(0)  # (n,) sum_v e^(z-top) (z-top) <= 0
    return zt.sum(0) - lse, lse, torch.log(total) - centred / total


# ----------------------------------------------------------------------------- torch path
def chunk_logits(h, w, b, inv_temp):
    """fp32 logits (n, V) of one chunk, divided by the temperature: fp32 accumulation and output
    for every dtype (on CUDA the GEMM itself outputs fp32; on CPU low precision is upcast first)."""
    if h.dtype != torch.float32:
        if h.is_cuda:
            z = torch.mm(h, w.t(), out_dtype=torch.float32)  # (n, V)
        else:
            z = h.float() @ w.float().t()  # (n, V)
        z = z if b is None else z.add_(b.float())
    else:
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())  # (n, V)
    return z.mul_(inv_temp)


def _torch_stats(h, w, b, targets, inv_temp, entropy):
    return row_stats(chunk_logits(h, w, b, inv_temp), targets, triton_path=False, entropy=entropy, overwrite=True)


# ----------------------------------------------------------------------------- autograd
class HeadGrads:
    """dL/dhidden (n, H), dL/dW (V, H) and dL/db (V,) accumulated chunk by chunk from dL/dlogits."""

    def __init__(self, h, w, needs):
        need_h, need_w, need_b = needs
        self.dh = torch.empty_like(h) if need_h else None  # (n, H)
        self.dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, H)
        self.db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None  # (V,)

    def add(self, dz, h, w, sl):
        """Fold the chunk ``dz`` (c, V) of rows ``sl`` in: two GEMMs and a column sum."""
        if self.dh is not None:
            torch.mm(dz, w, out=self.dh[sl])  # (c, H), written in place
        if self.dw is not None and dz.dtype == torch.float32:
            self.dw.addmm_(dz.t(), h[sl])  # (V, H), accumulated in place
        elif self.dw is not None:
            self.dw += (dz.t() @ h[sl]).float()  # (V, H)
        if self.db is not None:
            self.db += dz.float().sum(0)

    def result(self, w, b):
        """(dh, dW, db) in the dtypes of h, w and b (None where not needed)."""
        dw = None if self.dw is None else self.dw.to(w.dtype)
        db = None if self.db is None else self.db.to(b.dtype)
        return self.dh, dw, db


def chunk_rows(n_tokens: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    """Tokens per chunk: ``MEDIX_FAST_CHUNK_MB`` of fp32 logits (default 256 on CPU, 2048 on CUDA)."""
    if chunk_size is None:
        default = "2048" if device.type == "cuda" else "256"
        budget = float(os.environ.get("MEDIX_FAST_CHUNK_MB", default)) * 2**20
        chunk_size = max(64, int(budget // (4 * vocab)))
    return max(1, min(chunk_size, n_tokens))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, inv_temp, want_entropy, chunk, triton_path):
        stats = _triton_stats if triton_path else _torch_stats
        step = h.shape[0] if triton_path else chunk  # the Triton forward builds no logits
        pieces = [stats(h[i:i + step], w, b, targets[i:i + step], inv_temp, want_entropy)
                  for i in range(0, max(h.shape[0], 1), step)]
        logp, lse, ent = (torch.cat(x) for x in zip(*pieces))  # each (n,)
        ctx.save_for_backward(h, w, b, targets, lse, ent)
        ctx.cfg = (inv_temp, chunk, triton_path)
        entropy = ent if want_entropy else lse.new_empty(0)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, b, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk, triton_path = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None or g_ent.numel() == 0 else g_ent.float().contiguous()
        grads = HeadGrads(h, w, ctx.needs_input_grad[:3])
        for i in range(0, h.shape[0], chunk):
            sl = slice(i, i + chunk)
            z = chunk_logits(h[sl], w, b, inv_temp)  # (c, V) fp32, recomputed
            dz = row_grad(z, targets[sl], lse[sl], ent[sl], g_lp[sl], None if g_ent is None else g_ent[sl],
                          inv_temp, w.dtype, triton_path)  # (c, V) in w.dtype
            grads.add(dz, h, w, sl)
            del z, dz  # before the next chunk's logits exist: one (chunk, V) buffer at a time
        return (*grads.result(w, b), None, None, None, None, None)


# ----------------------------------------------------------------------------- public API
def _check(hidden, weight, targets, bias, temperature) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without H), "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        bad = targets[(targets < 0) | (targets >= weight.shape[0])][0].item()
        raise ValueError(f"targets must lie in [0, V={weight.shape[0]}), found {bad}")


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                          return_entropy=False, chunk_size=None):
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: (..., H) final hidden states, any float dtype (the compute dtype).
        weight: (V, H) LM-head weight; cast to ``hidden``'s dtype if it differs (autocast-style).
        targets: (...) integer token ids in [0, V).
        bias: optional (V,).
        temperature: logits are divided by it (sampling temperature).
        return_entropy: also return the per-token entropy of the same distribution.
        chunk_size: tokens per chunk of the backward's (chunk, V) gradient buffer (and of the
            CPU forward); default: ``MEDIX_FAST_CHUNK_MB`` MiB of fp32 logits (256 CPU, 2048 CUDA).

    Returns:
        logp (...) fp32, and entropy (...) fp32 when ``return_entropy``. Both differentiable
        with respect to ``hidden``, ``weight`` and ``bias``; no (tokens, V) tensor is built.
    """
    _check(hidden, weight, targets, bias, temperature)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (n, H)
    w = weight.to(h.dtype).contiguous()  # (V, H)
    b = bias.to(h.dtype).contiguous() if bias is not None else None
    t = targets.reshape(-1).contiguous()  # (n,)
    chunk = chunk_rows(max(1, h.shape[0]), w.shape[0], chunk_size, h.device)
    triton_path = use_triton(h) and h.shape[0] > 0
    logp, entropy = _FusedLinearLogprobs.apply(
        h, w, b, t, 1.0 / float(temperature), bool(return_entropy), chunk, triton_path)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp
