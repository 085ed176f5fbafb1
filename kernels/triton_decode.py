"""Paged split-K decode attention in Triton: one query block per item over the item's blocks.

    out, lse = paged_decode(q, k_pool, v_pool, table, lens, rows, scale)            # (b, H, D), (b, H) fp32
    out, _ = paged_decode(q, k_pool, v_pool, table2, lens2, rows2, scale, prior=(out, lse))  # merged

Item ``i`` owns the K/V of the first ``lens[i]`` tokens of blocks ``table[i]`` of the pool
(blocks, block_size, kv_heads, D) and the queries of batch rows ``rows[i]`` (padded with ``b``):
all their heads that share a K/V head form one (rows x heads-per-kv-head) query block, so K/V is
read once per item and KV head, not once per row or query head (GQA, and the cascade's prompt
groups: a group's samples are extra query rows over the same prompt blocks).

Algorithm (flash-decoding): program (item x query chunk, kv head, split) streams its split's share
of the item's live tokens in tiles of ``BLOCK_N`` (within one block: the block size is a
multiple), with an online softmax in fp32, and writes its unnormalised partial output, max and
sum; the combine program merges the splits by their maxima, optionally merges the result with a
``prior`` (output, log-sum-exp) per row (the cascade's other part), and scatters the normalised
output and log-sum-exp to the item's rows (``_finish``). With one split (the launch's choice when
the items alone fill the GPU) the split program finishes itself: no fp32 partials, no combine
(bf16 / fp16; fp32 on a GPU keeps the combine, its fp32 products leave no registers to spare).
Rows no item covers keep output 0, lse -inf. Splits are chosen so that about two programs run per
SM, and only live tokens are read: a split past an item's length does no loads. Offsets into the pool are 64-bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_BLOCK_M = 64  # query rows x heads per program (more: several query chunks per item)


# Row counts, split counts and index strides change with the batch and the lengths: no binary per value
_RUNTIME = ["n_rows", "stride_table", "stride_rows", "splits"]


@triton.jit
def _finish(acc, m_i, l_i, row, live, head, d, out_ptr, lse_ptr, prior_o_ptr, prior_lse_ptr, H,
            D: tl.constexpr, HAS_PRIOR: tl.constexpr):
    """Normalise a query block's (acc, max, sum), merge it with the prior by log-sum-exp, and store
    the output and log-sum-exp at its rows."""
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    o_off = row.to(tl.int64)[:, None] * H * D + head[:, None] * D + d[None, :]
    o_mask = live[:, None] & (d < D)[None, :]
    if HAS_PRIOR:  # merge with the other part of the cascade by log-sum-exp
        p_lse = tl.load(prior_lse_ptr + row.to(tl.int64) * H + head, mask=live, other=float("-inf"))
        p_out = tl.load(prior_o_ptr + o_off, mask=o_mask, other=0.0)
        top = tl.maximum(lse, p_lse)
        top = tl.where(top > float("-inf"), top, 0.0)
        wa = tl.exp(lse - top)
        wb = tl.exp(p_lse - top)
        total = wa + wb
        out = (out * wa[:, None] + p_out * wb[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
        lse = tl.where(total > 0, top + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(out_ptr + o_off, out, mask=o_mask)
    tl.store(lse_ptr + row.to(tl.int64) * H + head, lse, mask=live)


@triton.jit(do_not_specialize=_RUNTIME)
def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, rows_ptr, po_ptr, pm_ptr, pl_ptr,
                  out_ptr, lse_ptr, prior_o_ptr, prior_lse_ptr, H,
                  n_rows, scale, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                  stride_vh, stride_table, stride_rows, splits,
                  R: tl.constexpr, GM: tl.constexpr, QCHUNKS: tl.constexpr, BS: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  EXACT: tl.constexpr, ONE_SPLIT: tl.constexpr, HAS_PRIOR: tl.constexpr):
    pid = tl.program_id(0)
    item, chunk = pid // QCHUNKS, pid % QCHUNKS
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + item)
    per = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(length, start + per)

    m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the item: (row g, head r)
    g, r = m // R, m % R
    row = tl.load(rows_ptr + item * stride_rows + g, mask=g < GM, other=n_rows)
    live = (g < GM) & (row < n_rows)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_off = row.to(tl.int64)[:, None] * stride_qb + (kvh * R + r)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=live[:, None] & dmask[None, :], other=0.0)  # (BM, BD)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t0 in range(start, end, BLOCK_N):
        block = tl.load(table_ptr + item * stride_table + t0 // BS).to(tl.int64)
        offset = t0 % BS + n
        inside = t0 + n < end
        kv_mask = inside[:, None] & dmask[None, :]
        k = tl.load(k_ptr + block * stride_kb + offset[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0)  # (BN, BD)
        if EXACT:  # the interpreter, whose bf16 dot is wrong: fp32 products
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale  # (BM, BN) fp32
        s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile has a live token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block * stride_vb + offset[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0)
        if EXACT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if ONE_SPLIT:  # the whole item: straight to its rows
        _finish(acc, m_i, l_i, row, live, kvh * R + r, d, out_ptr, lse_ptr, prior_o_ptr, prior_lse_ptr, H,
                D=D, HAS_PRIOR=HAS_PRIOR)
    else:
        part = ((item * QCHUNKS + chunk) * tl.num_programs(1) + kvh) * splits + split  # partial index
        mm = tl.arange(0, BLOCK_M)
        seen = mm < tl.where(length > 0, BLOCK_M, 0)  # an empty item (a padded group of the static step) writes nothing
        tl.store(pm_ptr + part.to(tl.int64) * BLOCK_M + mm, m_i, mask=seen)
        tl.store(pl_ptr + part.to(tl.int64) * BLOCK_M + mm, l_i, mask=seen)
        tl.store(po_ptr + (part.to(tl.int64) * BLOCK_M + mm)[:, None] * BLOCK_D + d[None, :], acc,
                 mask=seen[:, None])


@triton.jit(do_not_specialize=["n_rows", "stride_rows", "splits"])
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, lens_ptr, rows_ptr, out_ptr, lse_ptr, prior_o_ptr, prior_lse_ptr, n_rows,
                    stride_rows, H, splits,
                    R: tl.constexpr, GM: tl.constexpr, QCHUNKS: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PRIOR: tl.constexpr):
    pid = tl.program_id(0)
    item, chunk = pid // QCHUNKS, pid % QCHUNKS
    kvh = tl.program_id(1)
    m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    g, r = m // R, m % R
    row = tl.load(rows_ptr + item * stride_rows + g, mask=g < GM, other=n_rows)
    live = (g < GM) & (row < n_rows)
    d = tl.arange(0, BLOCK_D)
    mm = tl.arange(0, BLOCK_M)
    seen = mm < tl.where(tl.load(lens_ptr + item) > 0, BLOCK_M, 0)  # an empty item's partials were never written

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s in range(splits):
        part = (((item * QCHUNKS + chunk) * tl.num_programs(1) + kvh) * splits + s).to(tl.int64)
        ms = tl.load(pm_ptr + part * BLOCK_M + mm, mask=seen, other=float("-inf"))
        ls = tl.load(pl_ptr + part * BLOCK_M + mm, mask=seen, other=0.0)
        os = tl.load(po_ptr + (part * BLOCK_M + mm)[:, None] * BLOCK_D + d[None, :], mask=seen[:, None], other=0.0)
        m_new = tl.maximum(m_i, ms)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # no -inf - -inf: both weights are then 0
        a = tl.exp(m_i - m_ref)
        b = tl.exp(ms - m_ref)
        l_i = l_i * a + ls * b
        acc = acc * a[:, None] + os * b[:, None]
        m_i = m_new
    _finish(acc, m_i, l_i, row, live, kvh * R + r, d, out_ptr, lse_ptr, prior_o_ptr, prior_lse_ptr, H,
            D=D, HAS_PRIOR=HAS_PRIOR)


@dataclass(frozen=True)
class DecodeLaunch:
    """The tiles, split count and grid ``paged_decode`` launches for one call's shapes (also what
    ``medix_fast.kernels.compile_check`` compiles for the shipped models)."""
    r: int  # query heads per kv head
    group: int  # query rows per item
    qchunks: int  # query blocks per item
    splits: int  # programs per (item, query block, kv head) along the tokens
    block_m: int
    block_n: int
    block_d: int
    exact: bool  # fp32 products (fp32 asked for, or the interpreter)
    num_warps: int  # 8 for exact fp32 (without tensor cores 4 warps spill at 64 x 128: compile check)
    # one split, finished by the split program itself (no partials, no combine); not for fp32 on a GPU,
    # whose fp32 products leave no registers for it (spills at 64 x 128, compile check)
    direct: bool

    def split_grid(self, items: int, kv_heads: int) -> tuple[int, int, int]:
        return items * self.qchunks, kv_heads, self.splits


def decode_launch(items: int, group: int, heads: int, kv_heads: int, dim: int, block_size: int, max_tokens: int,
                  dtype: torch.dtype, sms: int) -> DecodeLaunch:
    """The launch of ``paged_decode`` for ``items`` x ``group`` query rows of ``heads`` heads over at
    most ``max_tokens`` tokens per item on a GPU of ``sms`` SMs: splits so that about two programs run
    per SM, at most one per tile of tokens. fp32 takes exact fp32 products (``tl.dot``'s default
    would be TF32); so does the interpreter, whose bf16 dot is wrong."""
    r = heads // kv_heads
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(group * r)))
    qchunks = -(-group * r // block_m)
    block_n = min(block_size, 64)
    wanted = -(-2 * sms // max(1, items * kv_heads * qchunks))
    splits = max(1, min(wanted, 16, -(-max_tokens // block_n)))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    exact = dtype == torch.float32 or interpreted
    return DecodeLaunch(r, group, qchunks, splits, block_m, block_n, max(16, triton.next_power_of_2(dim)), exact,
                        8 if exact else 4, splits == 1 and (dtype != torch.float32 or interpreted))


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor, rows: torch.Tensor, scale: float,
                 prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q (b, H, D) over paged K/V; see the module docstring. Returns the rows'
    output (b, H, D) and log-sum-exp (b, H), fp32, merged with ``prior`` when given."""
    b, heads, dim = q.shape
    items, group = rows.shape
    _, block_size, kv_heads, _ = k_pool.shape
    if k_pool.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.dtype != k_pool.dtype:
        raise ValueError(f"paged_decode: q and the pool must share one of fp32/bf16/fp16, got {q.dtype}, {k_pool.dtype}")
    if heads % kv_heads or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"paged_decode: need heads ({heads}) a multiple of kv heads ({kv_heads}) and "
                         f"contiguous head dims")
    t = decode_launch(items, group, heads, kv_heads, dim, block_size, table.shape[1] * block_size, q.dtype,
                      sm_count(q.device))
    out = torch.zeros(b, heads, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((b, heads), float("-inf"), dtype=torch.float32, device=q.device)
    prior_o, prior_lse = (prior[0].contiguous(), prior[1].contiguous()) if prior is not None else (out, lse)
    one = t.direct  # the split program writes the rows itself: no partials (out stands in for them)
    parts = 0 if one else items * t.qchunks * kv_heads * t.splits
    po = out if one else torch.empty(parts, t.block_m, t.block_d, dtype=torch.float32, device=q.device)
    pm = out if one else torch.empty(parts, t.block_m, dtype=torch.float32, device=q.device)
    pl = out if one else torch.empty(parts, t.block_m, dtype=torch.float32, device=q.device)
    table, rows, lens = table.contiguous(), rows.contiguous(), lens.contiguous()
    _split_kernel[t.split_grid(items, kv_heads)](
        q, k_pool, v_pool, table, lens, rows, po, pm, pl, out, lse, prior_o, prior_lse, heads, b, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0),
        v_pool.stride(1), v_pool.stride(2), table.stride(0), rows.stride(0), t.splits,
        R=t.r, GM=group, QCHUNKS=t.qchunks, BS=block_size, D=dim, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, BLOCK_D=t.block_d, EXACT=t.exact, ONE_SPLIT=one, HAS_PRIOR=prior is not None,
        num_warps=t.num_warps)
    if not one:
        _combine_kernel[t.split_grid(items, kv_heads)[:2]](
            po, pm, pl, lens, rows, out, lse, prior_o, prior_lse, b, rows.stride(0), heads, t.splits,
            R=t.r, GM=group, QCHUNKS=t.qchunks, D=dim, BLOCK_M=t.block_m, BLOCK_D=t.block_d,
            HAS_PRIOR=prior is not None)
    return out, lse
