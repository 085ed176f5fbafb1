"""The engine's paged decode attention against an fp64 reference: the PyTorch path
(``attention.paged_attention``), the Triton kernel (``triton_decode.paged_decode``, under
``TRITON_INTERPRET=1`` on the CPU) and the cascade that merges a prompt part and an own part;
ragged lengths (0, 1, a block boundary, the table's full width), GQA ratios 1/4/8, block sizes
16 and 256, query groups with padded slots, fp32 and bf16, and 64-bit pool offsets. The
flash-attn glue is checked against the same reference with a stand-in for
``flash_attn_with_kvcache`` (flash-attn does not install here).

    pytest tests/test_paged_attention.py -q
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from medix_fast.generate import attention
from medix_fast.generate.kv_cache import DecodeStep
from medix_fast.kernels.triton_decode import paged_decode
from medix_fast.kernels import cpp

IMPLS = ["torch", "triton"] + (["cpp"] if cpp.available() else [])


def run_impl(impl: str, *args):
    """(out, lse) of the rows (b, H, D), (b, H) from one implementation of paged decode attention."""
    q = args[0]
    if impl == "torch":
        out, lse = attention.paged_attention(*args)
        return out[: q.shape[0]], lse[: q.shape[0]]
    return (paged_decode if impl == "triton" else cpp.paged_decode)(*args)


def reference(q, k_pool, v_pool, table, lens, rows, scale):
    """fp64 attention of each item's rows over its first lens[i] tokens: (b, H, D), (b, H) (-inf, 0 if unseen)."""
    b, heads, dim = q.shape
    kv = k_pool.shape[2]
    out = torch.zeros(b, heads, dim, dtype=torch.float64)
    lse = torch.full((b, heads), float("-inf"), dtype=torch.float64)
    for i in range(table.shape[0]):
        n = int(lens[i])
        keys = k_pool[table[i].long()].flatten(0, 1)[:n].double()  # (n, kv, D)
        vals = v_pool[table[i].long()].flatten(0, 1)[:n].double()
        for row in rows[i].tolist():
            if row >= b or n == 0:
                continue
            for h in range(heads):
                s = keys[:, h // (heads // kv)] @ q[row, h].double() * scale  # (n,)
                lse[row, h] = s.logsumexp(0)
                out[row, h] = torch.softmax(s, 0) @ vals[:, h // (heads // kv)]
    return out, lse


def make_case(heads: int, kv: int, block_size: int, lens: list[int], group: int, dtype, seed: int = 0, dim: int = 16):
    """A pool, per-item block tables (distinct shuffled blocks, widths for the longest item) and
    row groups (one padded slot per item when group > 1)."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, -(-max(lens) // block_size))
    blocks = len(lens) * width + 3
    k_pool = torch.randn(blocks, block_size, kv, dim, generator=g).to(dtype)
    v_pool = torch.randn(blocks, block_size, kv, dim, generator=g).to(dtype)
    table = (torch.randperm(blocks - 1, generator=g)[: len(lens) * width] + 1).view(len(lens), width).to(torch.int32)
    filled = max(1, group - 1) if group > 1 else 1
    b = len(lens) * filled
    q = torch.randn(b, heads, dim, generator=g).to(dtype)
    rows = torch.full((len(lens), group), b, dtype=torch.long)  # b: the padding row
    rows[:, :filled] = torch.randperm(b, generator=g).view(len(lens), filled)
    return q, k_pool, v_pool, table, torch.tensor(lens, dtype=torch.int32), rows


LENGTH_SETS = {16: [0, 1, 15, 16, 17, 40, 64], 256: [0, 1, 255, 256, 300, 512]}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 256])
def test_paged_attention_matches_fp64(impl, group, ratio, block_size):
    kv = 2 if ratio < 8 else 1
    q, k_pool, v_pool, table, lens, rows = make_case(kv * ratio, kv, block_size, LENGTH_SETS[block_size], group,
                                                     torch.float32)
    out, lse = run_impl(impl, q, k_pool, v_pool, table, lens, rows, 0.3)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, rows, 0.3)
    b = q.shape[0]
    torch.testing.assert_close(out[:b].double(), ref_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse[:b].double(), ref_lse, rtol=0, atol=2e-5)
    assert torch.isinf(lse[rows[0, 0]]).all(), "an item of length 0 leaves its rows unseen"


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_attention_bf16(impl):
    q, k_pool, v_pool, table, lens, rows = make_case(8, 2, 16, [3, 16, 50, 64], 3, torch.bfloat16, seed=1)
    out, lse = run_impl(impl, q, k_pool, v_pool, table, lens, rows, 0.25)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, rows, 0.25)
    b = q.shape[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:b].double(), ref_out, rtol=0, atol=2e-2)
    torch.testing.assert_close(lse[:b].double(), ref_lse, rtol=0, atol=1e-2)


def test_many_splits_and_query_chunks():
    """One item and a long table (so the launcher splits the tokens), and a group whose rows x
    heads exceed one query block (several query chunks)."""
    q, k_pool, v_pool, table, lens, rows = make_case(8, 1, 16, [300], 1, torch.float32, seed=2)
    ref = reference(q, k_pool, v_pool, table, lens, rows, 0.2)
    out, lse = paged_decode(q, k_pool, v_pool, table, lens, rows, 0.2)
    torch.testing.assert_close(out.double(), ref[0], rtol=0, atol=2e-5)
    q, k_pool, v_pool, table, lens, rows = make_case(8, 1, 16, [40, 7], 12, torch.float32, seed=3)  # 12 x 8 > 64
    ref = reference(q, k_pool, v_pool, table, lens, rows, 0.2)
    out, lse = paged_decode(q, k_pool, v_pool, table, lens, rows, 0.2)
    torch.testing.assert_close(out.double(), ref[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref[1], rtol=0, atol=2e-5)


def test_one_split_writes_the_rows_without_partials(monkeypatch):
    """Items that fill the GPU alone get one split each: the split kernel normalises, merges the
    prior and writes the rows itself (no fp32 partials, the combine kernel never launched)."""
    from medix_fast.kernels import triton_decode

    q, k_pool, v_pool, table, lens, rows = make_case(8, 2, 16, [0, 1, 17, 40], 3, torch.float32, seed=4)
    b, heads, dim = q.shape
    assert triton_decode.decode_launch(4, 3, heads, 2, dim, 16, table.shape[1] * 16, q.dtype, 2).splits == 1
    monkeypatch.setattr(triton_decode, "_combine_kernel", None)  # launching it would fail
    g = torch.Generator().manual_seed(5)
    prior = torch.randn(b, heads, dim, generator=g), torch.randn(b, heads, generator=g)
    out, lse = paged_decode(q, k_pool, v_pool, table, lens, rows, 0.3, prior=prior)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, rows, 0.3)
    expect = attention.merge(ref_out, ref_lse, prior[0].double(), prior[1].double())
    torch.testing.assert_close(out.double(), expect, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), torch.logaddexp(ref_lse, prior[1].double()), rtol=0, atol=2e-5)


def _cascade_step(b: int, block_size: int, seed: int):
    """A decode step of 3 groups (prompt lengths 0, 20, 33) and b rows with own lengths 1..; the
    pool holds both. Returns q, pools, the step and the fp64 reference of attention over each
    row's prompt tokens followed by its own."""
    g = torch.Generator().manual_seed(seed)
    heads, kv, dim = 8, 2, 16
    k_pool = torch.randn(64, block_size, kv, dim, generator=g)
    v_pool = torch.randn(64, block_size, kv, dim, generator=g)
    ids = iter((torch.randperm(63, generator=g) + 1).tolist())
    prompt_lens = [0, 20, 33]
    group_of = [i % 3 for i in range(b)]
    own_lens = [1 + (7 * i) % 29 for i in range(b)]
    gw = -(-max(prompt_lens) // block_size)
    ow = -(-max(own_lens) // block_size)
    group_table = torch.tensor([[next(ids) for _ in range(gw)] for _ in range(3)], dtype=torch.int32)
    row_table = torch.tensor([[next(ids) for _ in range(ow)] for _ in range(b)], dtype=torch.int32)
    members = [[r for r in range(b) if group_of[r] == p] for p in range(3)]
    gm = max(map(len, members))
    group_rows = torch.tensor([m + [b] * (gm - len(m)) for m in members])
    q = torch.randn(b, heads, dim, generator=g)

    def tokens(pool, table_row, n):
        return pool[table_row.long()].flatten(0, 1)[:n]

    ref = torch.zeros(b, heads, dim, dtype=torch.float64)
    for r in range(b):
        p = group_of[r]
        keys = torch.cat([tokens(k_pool, group_table[p], prompt_lens[p]), tokens(k_pool, row_table[r], own_lens[r])])
        vals = torch.cat([tokens(v_pool, group_table[p], prompt_lens[p]), tokens(v_pool, row_table[r], own_lens[r])])
        for h in range(heads):
            s = keys[:, h // 4].double() @ q[r, h].double() * 0.25
            ref[r, h] = torch.softmax(s, 0) @ vals[:, h // 4].double()
    step = DecodeStep(pool=None, backend="", slots=torch.zeros(b, dtype=torch.long), row_table=row_table,
                      row_lens=torch.tensor(own_lens, dtype=torch.int32), group_table=group_table,
                      group_lens=torch.tensor(prompt_lens, dtype=torch.int32), group_rows=group_rows)
    return q, k_pool, v_pool, step, ref


@pytest.mark.parametrize("backend", IMPLS + ["flash"])
@pytest.mark.parametrize("block_size", [16, 256])
def test_cascade_decode_equals_attention_over_prompt_then_own_tokens(backend, block_size, monkeypatch):
    if backend == "flash":
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_with_kvcache=_fake_flash))
    q, k_pool, v_pool, step, ref = _cascade_step(7, block_size, seed=block_size)
    out = attention.cascade_decode(q, k_pool, v_pool, step, 0.25, backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def _fake_flash(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, return_softmax_lse):
    """flash_attn_with_kvcache's contract in PyTorch: q (N, S, H, D), paged K/V, -> out (N, S, H, D),
    lse (N, H, S); rows of length 0 left as garbage (NaN), as flash-attn may."""
    assert not causal and return_softmax_lse and block_table.dtype == torch.int32
    n, s, heads, dim = q.shape
    rows = torch.arange(n * s).view(n, s)
    flat_q = q.reshape(n * s, heads, dim)
    out, lse = attention.paged_attention(flat_q, k_cache, v_cache, block_table, cache_seqlens, rows, softmax_scale)
    out, lse = out[:-1].view(n, s, heads, dim), lse[:-1].view(n, s, heads).transpose(1, 2)
    empty = cache_seqlens == 0
    return out.masked_fill(empty[:, None, None, None], float("nan")), lse.masked_fill(empty[:, None, None], float("nan"))


def test_pool_offsets_beyond_two_to_the_31():
    """Blocks whose element offsets pass 2**31 (a pool of > 2**31 elements, only the last blocks
    touched): the kernel's 64-bit offsets read them."""
    block_size, kv, dim = 16, 1, 16
    blocks = 2**31 // (block_size * kv * dim) + 4
    k_pool = torch.empty(blocks, block_size, kv, dim, dtype=torch.bfloat16)
    v_pool = torch.empty(blocks, block_size, kv, dim, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    last = torch.arange(blocks - 3, blocks, dtype=torch.int32)
    k_pool[last.long()] = torch.randn(3, block_size, kv, dim, generator=g).bfloat16()
    v_pool[last.long()] = torch.randn(3, block_size, kv, dim, generator=g).bfloat16()
    q = torch.randn(2, 4, dim, generator=g).bfloat16()
    table, lens, rows = last[None], torch.tensor([40], dtype=torch.int32), torch.tensor([[0, 1]])
    out, lse = paged_decode(q, k_pool, v_pool, table, lens, rows, 0.25)
    ref_out, ref_lse = reference(q, k_pool, v_pool, table, lens, rows, 0.25)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-2)


def test_backend_choice_is_made_in_one_place(monkeypatch):
    from medix_fast.kernels import force_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.select_backend(cpu) == ("cpp" if cpp.available() else "torch")
    with force_backend("torch"):
        assert attention.select_backend(cpu) == "torch"
    with force_backend("triton"):
        assert attention.select_backend(cpu) == "triton"  # TRITON_INTERPRET=1 in the tests
    monkeypatch.setattr(attention, "HAS_FLASH_ATTN", True)
    assert attention.select_backend(cuda) == "flash" and attention.select_backend(cuda, 16) == "triton"
    monkeypatch.setattr(attention, "HAS_FLASH_ATTN", False)
    assert attention.select_backend(cuda) == "triton"
    with force_backend("torch"):
        assert attention.select_backend(cuda) == "torch"
    assert attention.default_block_size("flash") == 256 and attention.default_block_size("triton") == 16
