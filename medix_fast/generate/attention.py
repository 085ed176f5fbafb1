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
``MEDIX_FAST_BACKEND``: "torch", "triton" or "cpp"):
- "flash": flash-attn's ``flash_attn_with_kvcache`` (paged, returns the LSE) for decode and
  ``flash_attn_varlen_func`` for prefill; CUDA with flash-attn installed and blocks of a multiple
  of 256 tokens (its paged-KV requirement);
- "triton": the split-K paged decode kernel of ``medix_fast.kernels.triton_decode``; CUDA default otherwise (on the
  CPU only under ``TRITON_INTERPRET=1``, when forced);
- "cpp": the C++ op ``paged_decode`` (``csrc/paged_attention.cpp``) reading the blocks in place;
  the CPU default when the C++ ops build (bench/bench_sampler.py: the gathers of the PyTorch path
  were half of a CPU decode step);
- "torch": gathers the live blocks and runs the same maths in PyTorch; the reference, and the CPU
  path without a compiler;
- "exact": a model in exact mode (``model/exact.py``, ``sampling.exact``), decode and prefill: each
  query over its keys gathered in position order through ``medix_fast.kernels.exact.attention``,
  the maths the trainer's forward takes, so the two agree bit for bit.
Prefill uses SDPA per sequence except under "flash" and "exact".
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..kernels import dispatch
from ..kernels.exact import attention as exact_attention

BACKENDS = ("flash", "triton", "cpp", "torch", "exact")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
FLASH_BLOCK = 256  # flash-attn's paged K/V needs page sizes that are multiples of 256


def select_backend(device: torch.device, block_size: int | None = None, exact: bool = False) -> str:
    """The decode back-end for K/V on ``device`` (see the module docstring); ``block_size`` None
    means the caller will pick a flash-compatible one; ``exact``: the model is in exact mode."""
    if exact:
        return "exact"
    forced = dispatch.requested_backend()
    if forced == "triton":
        return "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "torch"
    if device.type == "cpu" and forced in ("auto", "cpp"):
        return "cpp" if dispatch.use_cpp(torch.empty(0)) else "torch"
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
    if backend == "exact":
        slots, seen = step.memo("exact_keys", lambda: _decode_keys(step, k_pool.shape[1], b))  # (b, L), (b, 1)
        out = exact_attention(q.to(k_pool.dtype)[:, None], _take(k_pool, slots), _take(v_pool, slots), seen, scale)
        return out[:, 0].to(dtype)
    if backend == "cpp":
        from ..kernels import cpp
        o1, lse1 = cpp.paged_decode(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale)
        o2, lse2 = cpp.paged_decode(q, k_pool, v_pool, step.row_table, step.row_lens, None, scale)
        return merge(o1, lse1, o2, lse2).to(dtype)
    if backend == "torch":
        kv = k_pool.shape[2]
        group_valid = step.memo("group_valid", lambda: _valid(step.group_lens, step.group_table, k_pool.shape[1], kv))
        row_valid = step.memo("row_valid", lambda: _valid(step.row_lens, step.row_table, k_pool.shape[1], kv))
        o1, lse1 = paged_attention(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale,
                                   group_valid)
        o2, lse2 = paged_attention(q, k_pool, v_pool, step.row_table, step.row_lens, None, scale, row_valid)
        return merge(o1[:b], lse1[:b], o2, lse2).to(dtype)
    q = q.to(k_pool.dtype)  # the kernels take one dtype (autocast may leave q in fp32 after RoPE)
    own_rows = step.memo("own_rows", lambda: torch.arange(b, device=q.device)[:, None])  # (b, 1)
    if backend == "triton":
        from ..kernels.triton_decode import paged_decode
        prompt = paged_decode(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale)
        out, _ = paged_decode(q, k_pool, v_pool, step.row_table, step.row_lens, own_rows, scale, prior=prompt)
        return out.to(dtype)
    o1, lse1 = _flash_paged(q, k_pool, v_pool, step.group_table, step.group_lens, step.group_rows, scale)
    o2, lse2 = _flash_paged(q, k_pool, v_pool, step.row_table, step.row_lens, own_rows, scale)
    return merge(o1[:b], lse1[:b], o2[:b], lse2[:b]).to(dtype)


def _decode_keys(step, block_size: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's key slots in position order, its prompt's then its own, (b, L) int64 with L the
    tables' widths (no host read; past a row's keys the slots are any), and the keys it sees (b, 1)."""
    groups, width = step.group_rows.shape
    row_group = torch.empty(b + 1, dtype=torch.long, device=step.group_rows.device)
    row_group[step.group_rows.reshape(-1)] = torch.arange(groups, device=row_group.device).repeat_interleave(width)
    row_group = row_group[:b]  # (b,): each row's group
    prompt, own = _token_slots(step.group_table[row_group], block_size), _token_slots(step.row_table, block_size)
    cached = step.group_lens.long()[row_group][:, None]  # (b, 1)
    j = torch.arange(prompt.shape[1] + own.shape[1], device=prompt.device)[None]  # (1, L)
    slots = torch.where(j < cached, prompt.gather(1, j.clamp(max=prompt.shape[1] - 1).expand(b, -1)),
                        own.gather(1, (j - cached).clamp(0, own.shape[1] - 1)))
    return slots, cached + step.row_lens.long()[:, None]


def _token_slots(table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token slots (N, W * block_size) of block tables (N, W)."""
    return (table.long()[:, :, None] * block_size + torch.arange(block_size, device=table.device)).flatten(1)


def _take(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Tokens ``slots`` (N, L) of a pool view (blocks, block_size, kv, D) -> (N, L, kv, D)."""
    blocks, block_size, kv, dim = pool.shape
    flat = pool.permute(2, 0, 1, 3).reshape(kv, blocks * block_size, dim)  # a view if head-major
    return flat.index_select(1, slots.reshape(-1)).view(kv, *slots.shape, dim).permute(1, 2, 0, 3)


def _valid(lens: torch.Tensor, table: torch.Tensor, block_size: int, kv: int) -> torch.Tensor:
    """(kv * N, W * block_size) bool: which gathered token columns of each item are live."""
    return (torch.arange(table.shape[1] * block_size, device=lens.device) < lens[:, None]).repeat(kv, 1)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                    lens: torch.Tensor, rows: torch.Tensor | None, scale: float,
                    valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path. Item i's queries are the rows ``rows[i]`` (pad: b, a dummy row) of q
    (b, H, D), all heads (``rows`` None: item i is row i alone); its K/V the first ``lens[i]``
    tokens of blocks ``table[i]`` of ``k_pool``/``v_pool`` (blocks, block_size, kv, D views;
    head-major storage gathers without a transpose). ``valid``: ``_valid(...)``, computed here if
    not given. Returns the items' rows' normalised output and log-sum-exp (-inf where no token was
    seen), fp32: (b + 1, H, D) and (b + 1, H) with row b scratch, or (b, H, D), (b, H) if ``rows``
    is None."""
    b, heads, dim = q.shape
    items, width = table.shape
    group = 1 if rows is None else rows.shape[1]
    kv = k_pool.shape[2]
    r = heads // kv
    compute = torch.promote_types(q.dtype, torch.float32)
    if valid is None:
        valid = _valid(lens, table, k_pool.shape[1], kv)
    k, v = _gather(k_pool, table), _gather(v_pool, table)  # (kv*N, L, D)
    if rows is not None:
        q = torch.cat([q, q.new_zeros(1, heads, dim)])[rows]  # (N, G, H, D); row b: zeros
    qg = q.reshape(items, group, kv, r, dim).permute(2, 0, 1, 3, 4).reshape(kv * items, group * r, dim)
    s = torch.bmm(qg.to(compute), k.to(compute).transpose(1, 2)).mul_(scale)  # (kv*N, G*r, L)
    s = s.masked_fill_(~valid[:, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # an item with no token: p = 0 below
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)  # (kv*N, G*r, 1)
    o = torch.bmm(p, v.to(compute)).div_(denom.clamp_min(torch.finfo(compute).tiny))  # (kv*N, G*r, D)
    lse = m.add_(denom.log_())[..., 0]  # (kv*N, G*r): -inf where nothing was seen
    o = o.view(kv, items, group, r, dim).permute(1, 2, 0, 3, 4).reshape(items * group, heads, dim)
    lse = lse.view(kv, items, group, r).permute(1, 2, 0, 3).reshape(items * group, heads)
    if rows is None:
        return o, lse
    out = o.new_zeros(b + 1, heads, dim)
    out[rows.reshape(-1)] = o
    out_lse = lse.new_zeros(b + 1, heads)
    out_lse[rows.reshape(-1)] = lse
    return out, out_lse


def _gather(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Blocks ``table`` (N, W) of a pool view (blocks, block_size, kv, D) as (kv * N, W * block_size, D):
    one ``index_select`` of whole blocks (a memcpy each when the storage is head-major)."""
    blocks, block_size, kv, dim = pool.shape
    heads_first = pool.permute(2, 0, 1, 3).reshape(kv, blocks, block_size * dim)  # a view if head-major
    picked = heads_first.index_select(1, table.reshape(-1).long())  # (kv, N*W, block_size*D)
    return picked.view(kv * table.shape[0], table.shape[1] * block_size, dim)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two normalised partial attentions (b, H, D) with their log-sum-exps (b, H); lse2 finite."""
    w1 = torch.sigmoid(lse1 - lse2)[..., None]  # e^lse1 / (e^lse1 + e^lse2); 0 when lse1 = -inf
    return torch.lerp(o2, o1, w1)


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
    if backend == "exact":
        for start, end, prefix, prefix_len in items:
            ki, vi = k[start:end].to(k_pool.dtype), v[start:end].to(k_pool.dtype)  # (L, kv, D), as the pool holds them
            if prefix is not None:
                cached = _token_slots(prefix[None], k_pool.shape[1])[:, :prefix_len]  # (1, P)
                ki, vi = torch.cat([_take(k_pool, cached)[0], ki]), torch.cat([_take(v_pool, cached)[0], vi])
            seen = prefix_len + 1 + torch.arange(end - start, device=q.device)  # (L,)
            out[start:end] = exact_attention(q[start:end].to(k_pool.dtype)[None], ki[None], vi[None], seen[None],
                                             scale)[0].to(out.dtype)
        return out
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
