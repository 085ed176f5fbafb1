"""The engine's attention over the paged K/V pool, with the back-end chosen in one place.

Decode (``cascade_decode``), one query token per row:
1. prompt part: for each group (prompt) in the batch, the queries of its rows (all heads) are
   stacked as one query block over the group's shared prompt blocks, so the prompt's K/V is read
   once per step for all its samples;
2. own part: each row's query over its private blocks (its completion so far, incl. the new token);
3. the two partial softmaxes are merged by their log-sum-exp (FlashInfer's cascade attention).
Both parts read only live tokens (``lens``), never a padded maximum.

Prefill (``packed_prefill``): the step's sequences packed into one row; each attends causally to
itself and, when it recomputes a preempted row, fully to its prompt's cached blocks first.

Back-ends (``select_backend``; force one with ``medix_fast.kernels.force_backend`` /
``MEDIX_FAST_BACKEND``: "torch" or "triton"):
- "flash": flash-attn's ``flash_attn_with_kvcache`` (paged, returns the LSE) for decode and
  ``flash_attn_varlen_func`` for prefill; CUDA with flash-attn installed and blocks of a multiple
  of 256 tokens (its paged-KV requirement);
- "triton": the split-K paged decode kernel of ``triton_decode.py``; CUDA default otherwise (on the
  CPU only under ``TRITON_INTERPRET=1``, when forced);
- "torch": gathers the live blocks and runs the same maths in PyTorch; the CPU path.
Prefill uses SDPA per sequence except under "flash".
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..kernels import dispatch

BACKENDS = ("flash", "triton", "torch")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
FLASH_BLOCK = 256  # flash-attn's paged K/V needs page sizes that are multiples of 256


def select_backend(device: torch.device, block_size: int | None = None) -> str:
    """The decode back-end for K/V on ``device`` (see the module docstring); ``block_size`` None
    means the caller will pick a flash-compatible one."""
    forced = dispatch.requested_backend()
    if forced == "triton":
        return "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "torch"
    if forced in ("torch", "cpp") or device.type != "cuda":
        return "torch"
    if HAS_FLASH_ATTN and (block_size is None or block_size % FLASH_BLOCK == 0):
        return "flash"
    return "triton" if dispatch.HAS_TRITON else "torch"


def default_block_size(backend: str) -> int:
    return FLASH_BLOCK if backend == "flash" else 16


# ----------------------------------------------------------------------------- decode
def cascade_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step, scale: float,
                   backend: str) -> torch.Tensor:
    """q (b, H, D) against each row's prompt blocks and own blocks (``step``: a kv_cache.DecodeStep);
    returns (b, H, D) in q's dtype."""
    b, dtype = q.shape[0], q.dtype
    own_rows = torch.arange(b, device=q.device)[:, None]  # (b, 1)
    if backend != "torch":
        q = q.to(k_pool.dtype)  # the kernels take one dtype (autocast may leave q in fp32 after RoPE)
    if backend == "triton":
        from .triton_decode import paged_decode
        prompt = paged_decode(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale)
        out, _ = paged_decode(q, k_pool, v_pool, step.row_table, step.row_lens, own_rows, scale, prior=prompt)
        return out.to(dtype)
    part = _flash_paged if backend == "flash" else paged_attention
    o1, lse1 = part(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale)
    o2, lse2 = part(q, k_pool, v_pool, step.row_table, step.row_lens, own_rows, scale)
    return merge(o1[:b], lse1[:b], o2[:b], lse2[:b]).to(dtype)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                    lens: torch.Tensor, rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path. Item i's queries are the rows ``rows[i]`` (pad: b, a dummy row) of q
    (b, H, D), all heads; its K/V the first ``lens[i]`` tokens of blocks ``table[i]`` of
    ``k_pool``/``v_pool`` (blocks, block_size, kv, D). Returns each row's normalised output
    (b + 1, H, D) fp32 and log-sum-exp (b + 1, H) (-inf where it saw no token)."""
    b, heads, dim = q.shape
    items, width = table.shape
    group = rows.shape[1]
    kv = k_pool.shape[2]
    r = heads // kv
    length = width * k_pool.shape[1]
    k = k_pool[table.long()].reshape(items, length, kv, dim).permute(0, 2, 3, 1)  # (N, kv, D, L)
    v = v_pool[table.long()].reshape(items, length, kv, dim).transpose(1, 2)  # (N, kv, L, D)
    q_pad = torch.cat([q, q.new_zeros(1, heads, dim)])  # (b + 1, H, D)
    qg = q_pad[rows].view(items, group, kv, r, dim).transpose(1, 2).reshape(items, kv, group * r, dim)
    compute = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(qg.to(compute), k.to(compute)) * scale  # (N, kv, G*r, L)
    valid = torch.arange(length, device=q.device) < lens[:, None]  # (N, L)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an item with no token: p = 0 below
    p = (s - m).exp()
    denom = p.sum(-1, keepdim=True)  # (N, kv, G*r, 1)
    o = torch.matmul(p, v.to(compute)) / denom.clamp_min(torch.finfo(compute).tiny)  # (N, kv, G*r, D)
    lse = (m + denom.log())[..., 0]  # (N, kv, G*r): -inf where nothing was seen
    out = q_pad.new_zeros(b + 1, heads, dim, dtype=compute)
    out[rows.reshape(-1)] = o.view(items, kv, group, r, dim).transpose(1, 2).reshape(items * group, heads, dim)
    out_lse = q_pad.new_zeros(b + 1, heads, dtype=compute)
    out_lse[rows.reshape(-1)] = lse.view(items, kv, group, r).transpose(1, 2).reshape(items * group, heads)
    return out, out_lse


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two normalised partial attentions (b, H, D) with their log-sum-exps (b, H); lse2 finite."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp(), (lse2 - m).exp()  # (b, H)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]


def _flash_paged(q, k_pool, v_pool, table, lens, rows, scale):
    """``paged_attention`` through flash-attn: an item's rows are its query positions (non-causal)."""
    from flash_attn import flash_attn_with_kvcache

    b, heads, dim = q.shape
    items, group = rows.shape
    q_pad = torch.cat([q, q.new_zeros(1, heads, dim)])
    o, lse = flash_attn_with_kvcache(q_pad[rows], k_pool, v_pool, cache_seqlens=lens, block_table=table,
                                     softmax_scale=scale, causal=False, return_softmax_lse=True)  # (N, G, H, D), (N, H, G)
    empty = (lens == 0)[:, None, None]  # flash-attn leaves those rows undefined
    lse = lse.transpose(1, 2).float().masked_fill(empty, float("-inf"))  # (N, G, H)
    out = q_pad.new_zeros(b + 1, heads, dim, dtype=torch.float32)
    out[rows.reshape(-1)] = o.float().masked_fill(empty[..., None], 0).reshape(items * group, heads, dim)
    out_lse = q_pad.new_zeros(b + 1, heads, dtype=torch.float32)
    out_lse[rows.reshape(-1)] = lse.reshape(items * group, heads)
    return out, out_lse


# ----------------------------------------------------------------------------- prefill
def packed_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   items: list, scale: float, backend: str) -> torch.Tensor:
    """q (N, H, D), k/v (N, kv, D) of packed sequences ``items`` (start, end, prefix blocks or None,
    prefix length) -> (N, H, D)."""
    out = torch.empty_like(q)
    plain = [it for it in items if it[2] is None]
    if backend == "flash" and plain:
        _flash_varlen(q, k, v, plain, scale, out)
        items = [it for it in items if it[2] is not None]
    for start, end, prefix, prefix_len in items:
        qi = q[start:end].transpose(0, 1)[None]  # (1, H, L, D)
        ki, vi = k[start:end], v[start:end]  # (L, kv, D)
        mask = None
        if prefix is not None:
            ki = torch.cat([k_pool[prefix].flatten(0, 1)[:prefix_len], ki])  # (P + L, kv, D)
            vi = torch.cat([v_pool[prefix].flatten(0, 1)[:prefix_len], vi])
            pos = torch.arange(prefix_len + end - start, device=q.device)
            mask = pos[None, :] <= pos[prefix_len:, None]  # (L, P + L): bottom-right causal
        o = F.scaled_dot_product_attention(qi, ki.transpose(0, 1)[None].to(q.dtype), vi.transpose(0, 1)[None].to(q.dtype),
                                           attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def _flash_varlen(q, k, v, items, scale, out) -> None:
    from flash_attn import flash_attn_varlen_func

    index = torch.cat([torch.arange(s, e, device=q.device) for s, e, _, _ in items])
    lengths = torch.tensor([0] + [e - s for s, e, _, _ in items], device=q.device)
    cu = lengths.cumsum(0).to(torch.int32)
    longest = max(e - s for s, e, _, _ in items)
    out[index] = flash_attn_varlen_func(q[index], k[index].to(q.dtype), v[index].to(q.dtype), cu, cu, longest, longest,
                                        softmax_scale=scale, causal=True)
