"""Log-probs (and entropy) straight from hidden states and the LM head, never building logits.

    logp[i]    = log softmax(cap(h_i . W^T + b) / T)[targets_i]        fp32
    entropy[i] = -sum_v p_iv log p_iv  of the same tempered distribution   fp32

    cap(z) = c tanh(z / c) with ``softcap=c`` (Gemma-2's final_logit_softcapping), else z; the
    backward multiplies dL/dcap(z) by 1 - tanh^2(z / c), read back from the capped logits.

Forward, Triton path: one kernel computes logit tiles (BLOCK_M tokens x BLOCK_V vocab) with
``tl.dot`` and folds them into an online logsumexp, an online sum of p*z (for the entropy) and
the target logit, all in fp32 registers; the vocabulary is split across programs when the token
count alone cannot fill the GPU (the split is the grid's fast axis, so programs resident together
share rows of h), and the splits are merged by a tiny torch epilogue. fp32 inputs take tf32
tensor cores unless ``fp32_precision="ieee"``. Offsets are 64-bit and rows may have any stride.
Backward: for a chunk of tokens the fp32 logits are recomputed by one GEMM (cuBLAS, fp32 output),
a row kernel (``logits_rows.py``) turns them into dL/dlogits in the weight's dtype, and two GEMMs
give dL/dhidden and dL/dW (accumulated in fp32). Peak extra memory is O(chunk x V), never O(tokens x V).

Dtypes: the GEMMs run in the compute dtype (autocast's when autocast is on, else hidden's);
autocast is off inside the autograd Functions, which cast explicitly and return gradients in the
inputs' dtypes. No host-device sync (the target range check runs with ``MEDIX_FAST_DEBUG=1``).

The torch path (CPU, and the reference the kernels are tested against) follows the same chunked
plan with the logits of one chunk materialised at a time.

Run ``python -m pytest tests/test_logprobs.py`` to check both paths against fp64.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import backend_for, debug_checks
from .logits_rows import row_grad, row_stats


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _tanh(x):
    """fp32 tanh from exp (the interpreter has no libdevice tanh): a series where |x| < 1/8, since
    1 - e^(-2|x|) cancels there; no overflow for any x."""
    e = tl.exp(-2.0 * tl.abs(x))
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.125, near, tl.where(x < 0, -far, far))


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, vocab, hidden, stride_h, stride_w, inv_temp, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = cap(h[rows] . W[cols]^T + b[cols]) * inv_temp in fp32; -inf outside the vocabulary."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h  # (BM, 1) 64-bit: n * H may pass 2^31
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w  # (1, BV) 64-bit: V * H may pass 2^31
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_rows + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < hidden), other=0.0)  # (BM, BK)
        w = tl.load(w_cols + k[:, None], mask=(cols[None, :] < vocab) & (k[:, None] < hidden), other=0.0)  # (BK, BV)
        if PRECISION == "ieee":  # exact fp32 products (asked for, or the interpreter, whose bf16 dot is wrong)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)  # the precision only matters for fp32 inputs
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)  # (BM, BV) in (-c, c)
    return tl.where(cols[None, :] < vocab, acc * inv_temp, float("-inf"))  # (BM, BV)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, max_ptr, sum_ptr, pz_ptr, zt_ptr,
                    n_rows, vocab, hidden, stride_h, stride_w, inv_temp, softcap, v_per_split,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (max m, sum e^(z-m), sum e^(z-m)(z-m), target logit) of a token block over a vocab split.

    Grid (splits, row blocks): the vocabulary split is the fast axis, so the programs resident at
    once mostly share row blocks and read the same rows of h from L2."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    tgt = tl.load(tgt_ptr + rows, mask=rows < n_rows, other=-1)  # (BM,)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # (BV,)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, v_end, hidden, stride_h, stride_w, inv_temp,
                        softcap, HAS_BIAS, HAS_SOFTCAP, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)  # (BM, BV)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 outside the vocabulary
        # pz = sum e^(z-m) (z-m) <= 0, kept relative to the running max: entropy without cancellation
        shift = s * tl.where(s > 0, m - m_new, 0.0)
        pz = (pz + shift) * scale + tl.sum(e * tl.where(cols[None, :] < v_end, z - m_new[:, None], 0.0), axis=1)
        s = s * scale + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split.to(tl.int64) * n_rows + rows
    keep = rows < n_rows
    tl.store(max_ptr + out, m, mask=keep)
    tl.store(sum_ptr + out, s, mask=keep)
    tl.store(pz_ptr + out, pz, mask=keep)
    tl.store(zt_ptr + out, zt, mask=keep)


# ----------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    programs_per_sm: int = 1  # resident at once (the compile check verifies it on sm_80 and sm_90)


# The tiles the GPU runs (tests/test_logprobs.py runs them under the interpreter too), chosen by
# ``python -m medix_fast.kernels --compile-check``: no register spill, and the blocks per SM it
# reports from the compiled binary (1 for each: 255 registers with bf16 wgmma tiles on sm_90, 144 KB
# of shared memory with tf32) are ``programs_per_sm``, from which ``launch_shape`` splits the
# vocabulary. fp32 with fp32_precision="ieee" (no tensor cores) has its own (64 x 128 x 64 at 4
# warps spills); sm_80 (mma.sync, registers for the accumulator and the softmax) smaller ones.
GPU_TILES = {torch.float32: Tiles(64, 128, 64, 4), torch.bfloat16: Tiles(128, 128, 64, 8),
             torch.float16: Tiles(128, 128, 64, 8)}
SM80_TILES = {torch.float32: Tiles(64, 128, 32, 8), torch.bfloat16: Tiles(64, 128, 64, 8),
              torch.float16: Tiles(64, 128, 64, 8)}
IEEE_TILES = Tiles(64, 128, 32, 8)
NUM_STAGES = 3


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tiles(dtype: torch.dtype, vocab: int, fp32_precision: str = "tf32", major: int = 9) -> Tiles:
    """The forward kernel's tiles on a GPU of compute capability ``major``.x: ``GPU_TILES`` (sm_90
    and later), ``SM80_TILES``, ``IEEE_TILES``; under the interpreter (numpy runs each tile) fewer,
    wider ones."""
    if interpreting():
        return Tiles(16, 64 if vocab <= 16384 else 1024, 32, 4)
    if dtype == torch.float32 and fp32_precision == "ieee":
        return IEEE_TILES
    return (GPU_TILES if major >= 9 else SM80_TILES)[dtype]


def dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    """``tl.dot``'s input precision: tf32 tensor cores for fp32 inputs unless ``fp32_precision``
    is "ieee" (ignored for bf16/fp16 inputs); always "ieee" under the interpreter."""
    return "ieee" if interpreting() or (dtype == torch.float32 and fp32_precision == "ieee") else "tf32"


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def major(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).major if device.type == "cuda" else 9


def launch_shape(n: int, vocab: int, t: Tiles, sms: int) -> tuple[int, int, int]:
    """(splits, vocab per split, row blocks): the vocabulary is split across programs when the
    row blocks alone cannot fill every SM with as many programs as it holds at once
    (``t.programs_per_sm``); the grid is (splits, row blocks)."""
    row_blocks = triton.cdiv(n, t.block_m)
    splits = max(1, min(triton.cdiv(t.programs_per_sm * sms, row_blocks), triton.cdiv(vocab, 4 * t.block_v)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), t.block_v) * t.block_v
    return triton.cdiv(vocab, v_per_split), v_per_split, row_blocks


def _triton_stats(h, w, b, targets, cfg, want_entropy):
    """(logp, lse, entropy) per token, fp32, from the fused forward kernel (which always has the
    entropy: its two extra sums cost nothing beside the GEMM, so ``want_entropy`` is not needed)."""
    n, hidden = h.shape
    vocab = w.shape[0]
    t = tiles(h.dtype, vocab, cfg.fp32_precision, major(h.device))
    splits, v_per_split, row_blocks = launch_shape(n, vocab, t, sm_count(h.device))
    part = torch.empty(4, splits, n, dtype=torch.float32, device=h.device)  # (4, S, n)
    _forward_kernel[(splits, row_blocks)](
        h, w, b if b is not None else h, targets, part[0], part[1], part[2], part[3],
        n, vocab, hidden, h.stride(0), w.stride(0), cfg.inv_temp, cfg.softcap or 1.0, v_per_split,
        HAS_BIAS=b is not None, HAS_SOFTCAP=cfg.softcap is not None,
        PRECISION=dot_precision(h.dtype, cfg.fp32_precision),
        BLOCK_M=t.block_m, BLOCK_V=t.block_v, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=NUM_STAGES,
    )
    m, s, pz, zt = part.unbind(0)  # each (S, n)
    top = m.max(dim=0).values  # (n,)
    scale = torch.exp(m - top)  # (S, n)
    total = (s * scale).sum(0)  # (n,)
    lse = top + torch.log(total)
    centred = ((pz + s * (m - top)) * scale).sum(0)  # (n,) sum_v e^(z-top) (z-top) <= 0
    logp = torch.where((targets >= 0) & (targets < vocab), zt.sum(0) - lse, float("nan"))  # NaN: id out of range
    return logp, lse, torch.log(total) - centred / total


# ----------------------------------------------------------------------------- torch path
def chunk_logits(h, w, b, inv_temp, softcap=None):
    """fp32 logits (n, V) of one chunk, capped (``softcap``) and divided by the temperature: fp32
    accumulation and output for every dtype (on CUDA the GEMM itself outputs fp32; on CPU low
    precision is upcast first)."""
    if h.dtype != torch.float32:
        if h.is_cuda:
            z = torch.mm(h, w.t(), out_dtype=torch.float32)  # (n, V)
        else:
            z = h.float() @ w.float().t()  # (n, V)
        z = z if b is None else z.add_(b.float())
    else:
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())  # (n, V)
    if softcap is not None:
        return z.div_(softcap).tanh_().mul_(softcap * inv_temp)  # (n, V) in (-c/T, c/T)
    return z.mul_(inv_temp)


def _torch_stats(h, w, b, targets, cfg, want_entropy):
    return row_stats(chunk_logits(h, w, b, cfg.inv_temp, cfg.softcap), targets, triton_path=False, entropy=want_entropy,
                     overwrite=True)


# ----------------------------------------------------------------------------- dtypes, autograd
@dataclass(frozen=True)
class HeadConfig:
    """How one LM-head call computes (fixed before the autograd Function runs)."""
    dtype: torch.dtype  # compute dtype of the GEMMs (see compute_dtype)
    inv_temp: float
    chunk: int  # tokens per (chunk, V) fp32 logits buffer
    triton_path: bool
    fp32_precision: str = "tf32"  # the Triton forward's tl.dot for fp32 inputs: "tf32" or "ieee"
    softcap: float | None = None  # logits capped to c tanh(z / c) before the temperature


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The LM head's compute dtype: autocast's when autocast is on for ``hidden``'s device (the
    GEMM the head replaces would run in it), else ``hidden``'s own."""
    kind = hidden.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def no_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device: inside the Functions every dtype is chosen explicitly."""
    kind = t.device.type
    return torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext()


def cast(tensors, dtype: torch.dtype):
    """Each tensor (or None) in ``dtype`` (no copy when it already is)."""
    return tuple(None if x is None else x.to(dtype) for x in tensors)


class HeadGrads:
    """dL/dhidden (n, H), dL/dW (V, H) and dL/db (V,) accumulated chunk by chunk from dL/dlogits.

    dW and db are fp32 buffers the chunks accumulate into in place: on CUDA a bf16/fp16 dz goes
    into dW through one GEMM with fp32 output (cuBLAS, fp32 accumulation), so no (V, H) product
    is ever rounded to low precision or held as a temporary."""

    def __init__(self, h, w, needs):
        need_h, need_w, need_b = needs
        self.dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None  # (n, H)
        self.dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None  # (V, H)
        self.db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None  # (V,)

    def add(self, dz, h, w, sl):
        """Fold the chunk ``dz`` (c, V) of rows ``sl`` in: two GEMMs and a column sum. ``dz`` is
        fp32, or in ``w``'s dtype when the Triton row kernel wrote it so."""
        hc = h[sl]  # (c, H)
        if self.dh is not None:
            torch.mm(dz.to(w.dtype), w, out=self.dh[sl])  # (c, H), written in place
        if self.dw is not None and (dz.dtype == torch.float32 or dz.device.type == "cpu"):
            self.dw.addmm_(dz.t().float(), hc.float())  # (V, H) fp32 operands (the CPU has no mixed GEMM)
        elif self.dw is not None:
            torch.addmm(self.dw, dz.t(), hc, out_dtype=torch.float32, out=self.dw)  # (V, H) fp32 output
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)  # (V,)

    def result(self, dtypes):
        """(dh, dW, db) in ``dtypes`` (those of the caller's hidden, weight and bias); None where not needed."""
        return tuple(None if g is None else g.to(d) for g, d in zip((self.dh, self.dw, self.db), dtypes))


def chunk_rows(n_tokens: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    """Tokens per chunk: ``MEDIX_FAST_CHUNK_MB`` of fp32 logits (default 256 on CPU, 2048 on CUDA)."""
    if chunk_size is None:
        default = "2048" if device.type == "cuda" else "256"
        budget = float(os.environ.get("MEDIX_FAST_CHUNK_MB", default)) * 2**20
        chunk_size = max(64, int(budget // (4 * vocab)))
    return max(1, min(chunk_size, n_tokens))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, want_entropy, cfg):
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        with no_autocast(hidden):
            h, w, b = cast((hidden, weight, bias), cfg.dtype)
            stats = _triton_stats if cfg.triton_path else _torch_stats
            step = h.shape[0] if cfg.triton_path else cfg.chunk  # the Triton forward builds no logits
            pieces = [stats(h[i:i + step], w, b, targets[i:i + step], cfg, want_entropy)
                      for i in range(0, max(h.shape[0], 1), step)]
            logp, lse, ent = (torch.cat(x) for x in zip(*pieces))  # each (n,)
        ctx.save_for_backward(h, w, b, targets, lse, ent)
        ctx.cfg = cfg
        entropy = ent if want_entropy else lse.new_empty(0)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, b, targets, lse, ent = ctx.saved_tensors
        cfg = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None or g_ent.numel() == 0 else g_ent.float().contiguous()
        grads = HeadGrads(h, w, ctx.needs_input_grad[:3])
        with no_autocast(h):
            for i in range(0, h.shape[0], cfg.chunk):
                sl = slice(i, i + cfg.chunk)
                z = chunk_logits(h[sl], w, b, cfg.inv_temp, cfg.softcap)  # (c, V) fp32, recomputed
                dz = row_grad(z, targets[sl], lse[sl], ent[sl], g_lp[sl], None if g_ent is None else g_ent[sl],
                              cfg.inv_temp, w.dtype, cfg.triton_path, cfg.softcap)  # (c, V)
                grads.add(dz, h, w, sl)
                del z, dz  # before the next chunk's logits exist: one (chunk, V) buffer at a time
        return (*grads.result(ctx.dtypes), None, None, None)


# ----------------------------------------------------------------------------- public API
def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Target ids in [0, V): a value check, so it reads device memory (a host sync) and runs only
    when ``debug_checks()`` (``MEDIX_FAST_DEBUG=1``)."""
    if debug_checks() and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        bad = (targets < 0) | (targets >= vocab)
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must lie in [0, V={vocab}), found {targets[where].item()} at {where}")


def check_softcap(softcap) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check(hidden, weight, targets, bias, temperature, fp32_precision, softcap=None) -> None:
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
    check_softcap(softcap)
    if fp32_precision not in ("tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32' or 'ieee', got {fp32_precision!r}")
    check_targets(targets, weight.shape[0])


def rows_of(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` (..., H) as (n, H) with unit stride along H; any row stride is kept (no copy)."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (n, H)
    return h if h.stride(-1) == 1 else h.contiguous()


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                          return_entropy=False, chunk_size=None, fp32_precision="tf32", softcap=None):
    """Log-probs of ``targets`` under ``softmax(cap(hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: (..., H) final hidden states, any float dtype.
        weight: (V, H) LM-head weight; bias: optional (V,).
        targets: (...) integer token ids in [0, V) (checked only with ``MEDIX_FAST_DEBUG=1``: the
            check reads them on the host).
        temperature: logits are divided by it (sampling temperature), after the cap.
        softcap: c of the logit soft-cap ``c * tanh(z / c)`` (Gemma-2/3's ``final_logit_softcapping``);
            None: no cap.
        return_entropy: also return the per-token entropy of the same distribution.
        chunk_size: tokens per chunk of the backward's (chunk, V) gradient buffer (and of the
            CPU forward); default: ``MEDIX_FAST_CHUNK_MB`` MiB of fp32 logits (256 CPU, 2048 CUDA).
        fp32_precision: for fp32 inputs on the GPU, the Triton forward's products: "tf32" (tensor
            cores, the default) or "ieee" (exact fp32, several times slower). The cuBLAS GEMMs
            follow PyTorch's own setting (``torch.backends.cuda.matmul``).

    The GEMMs run in ``hidden``'s dtype, or in autocast's when autocast is on (``weight`` and
    ``bias`` are cast to it), always with fp32 accumulation and fp32 softmax statistics; autocast
    is off inside. Gradients come back in the dtypes of ``hidden``, ``weight`` and ``bias`` (an
    fp32 master weight gets its fp32 dW, accumulated in fp32).

    Returns:
        logp (...) fp32, and entropy (...) fp32 when ``return_entropy``. Both differentiable
        with respect to ``hidden``, ``weight`` and ``bias``; no (tokens, V) tensor is built.
    """
    _check(hidden, weight, targets, bias, temperature, fp32_precision, softcap)
    lead = hidden.shape[:-1]
    h = rows_of(hidden)  # (n, H)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()  # (V, H)
    t = targets.reshape(-1).contiguous()  # (n,)
    cfg = HeadConfig(compute_dtype(hidden), 1.0 / float(temperature),
                     chunk_rows(max(1, h.shape[0]), w.shape[0], chunk_size, h.device),
                     backend_for("fused_linear_logprobs", h) == "triton" and h.shape[0] > 0, fp32_precision,
                     None if softcap is None else float(softcap))
    b = None if bias is None else bias.contiguous()  # (V,)
    logp, entropy = _FusedLinearLogprobs.apply(h, w, b, t, bool(return_entropy), cfg)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if return_entropy else logp
