"""Tests of the rollout engine's own behaviour (medix_fast.generate): continuous batching with many
more rows than decode slots, preemption in a pool too small for the batch, greedy parity with
``generate`` through all of it, batch independence of sampled completions, block accounting
(shared prompt blocks, nothing leaked, also after an exception), the scheduler against a random
workload without a model, one host sync per decode step, and the pool's lifetime.

    pytest tests/test_engine.py -q
"""
from __future__ import annotations

import random

import pytest
import torch

from medix_fast.generate import Sampler
from medix_fast.generate.blocks import BlockPool
from medix_fast.generate.memory import kv_bytes_per_token
from medix_fast.generate.scheduler import Scheduler
from medix_fast.generate.sequence import Group, Row
from syncs import count_decode_loop
from test_sampler import ARCHS, VOCAB, hf_greedy, make_prompts, one_thread, tiny_model  # noqa: F401 (fixture)

LENGTHS = [5, 1, 17, 16, 33, 2, 15, 9]  # mixed, across block boundaries of 16, one single-token prompt


def pool_gb(model, blocks: int, block_size: int = 16) -> float:
    """kv_cache_gb giving a pool of ``blocks`` blocks (one of them reserved) for ``model``."""
    return blocks * block_size * kv_bytes_per_token(model.config, model.dtype) / 2**30


# ------------------------------------------------------------------ greedy parity under pressure
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_parity_with_continuous_batching_and_preemption(arch):
    """24 rows through 5 decode slots and a pool of 9 blocks (the 24 rows' prompts and 30-token
    completions need ~60): rows join as others finish, the newest are preempted and recomputed,
    and every completion still equals generate's."""
    model = tiny_model(arch)
    prompts = make_prompts(LENGTHS)
    refs = [hf_greedy(model, p, 30) for p in prompts]
    stop = refs[0][3]
    refs_stop = [hf_greedy(model, p, 30, eos=stop) for p in prompts]
    sampler = Sampler(model, max_num_seqs=5, kv_cache_gb=pool_gb(model, 9))
    out = sampler.generate(prompts, n=3, max_new_tokens=30, temperature=0, stop_token_ids=[])
    assert out.completion_ids == [r for r in refs for _ in range(3)]
    assert sampler.stats.preemptions > 0 and sampler.stats.pool_blocks == 9
    out = sampler.generate(prompts, n=3, max_new_tokens=30, temperature=0, stop_token_ids=[stop])
    assert out.completion_ids == [r for r in refs_stop for _ in range(3)]
    assert {len(r) for r in refs_stop} != {30}


def test_static_step_with_preemption_matches_generate():
    model = tiny_model("qwen3")
    prompts = make_prompts(LENGTHS[:5])
    refs = [hf_greedy(model, p, 24) for p in prompts]
    sampler = Sampler(model, max_num_seqs=6, kv_cache_gb=pool_gb(model, 8), decode_mode="static")
    out = sampler.generate(prompts, n=2, max_new_tokens=24, temperature=0, stop_token_ids=[])
    assert out.completion_ids == [r for r in refs for _ in range(2)]
    assert sampler.stats.preemptions > 0


def test_triton_paged_kernel_in_the_engine():
    """The engine's fixed-shape step on the Triton decode kernel (interpreted on the CPU, hence
    the small sizes): greedy output equals generate's with 4 rows through 3 decode slots."""
    from medix_fast.kernels import force_backend

    model = tiny_model("llama", torch.float32)
    prompts = make_prompts([5, 17])
    refs = [hf_greedy(model, p, 6) for p in prompts]
    sampler = Sampler(model, max_num_seqs=3, decode_mode="static")
    with force_backend("triton"):
        out = sampler.generate(prompts, n=2, max_new_tokens=6, temperature=0, stop_token_ids=[])
    assert out.completion_ids == [r for r in refs for _ in range(2)]


# ------------------------------------------------------------------ batch independence
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (20, 0.95)])
def test_completions_do_not_depend_on_the_batch(top_k, top_p):
    """Same call with 4 or 64 decode slots, with a pool that forces preemption, and with the
    fixed-shape step: identical completions, the same log-probs (fp32)."""
    model = tiny_model("qwen2", torch.float32)
    prompts = make_prompts(LENGTHS)
    kwargs = dict(n=4, max_new_tokens=24, temperature=1.0, top_k=top_k, top_p=top_p, stop_token_ids=[3, 7, 11],
                  seed=123)
    ref = Sampler(model, max_num_seqs=64).generate(prompts, **kwargs)
    small = Sampler(model, max_num_seqs=4)
    tight = Sampler(model, max_num_seqs=16, kv_cache_gb=pool_gb(model, 10))
    static = Sampler(model, max_num_seqs=7, decode_mode="static")
    for sampler in (small, tight, static):
        out = sampler.generate(prompts, **kwargs)
        assert out.completion_ids == ref.completion_ids
        assert out.finish_reasons == ref.finish_reasons
        for a, b in zip(out.logprobs, ref.logprobs):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert tight.stats.preemptions > 0
    assert len({tuple(c) for c in ref.completion_ids}) > len(prompts), "samples of a prompt differ"
    other = small.generate(prompts, **{**kwargs, "seed": 124})
    assert other.completion_ids != ref.completion_ids


# ------------------------------------------------------------------ block accounting
def test_prompt_blocks_are_shared_and_every_block_comes_back():
    model = tiny_model("llama")
    prompts = make_prompts([40, 3, 20])
    sampler = Sampler(model, max_num_seqs=12)
    seen = []

    def record(module, args, kwargs):
        if sampler.blocks is not None:
            seen.append((max(sampler.blocks.refs), sampler.blocks.in_use))

    hook = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    sampler.generate(prompts, n=4, max_new_tokens=20, temperature=1.0, stop_token_ids=[], seed=0)
    hook.remove()
    assert max(r for r, _ in seen) == 4, "a prompt's blocks are held by each of its 4 running samples"
    assert sampler.blocks.in_use == 0 and not any(sampler.blocks.refs)
    sampler.blocks.check_idle()
    # K/V bytes follow live tokens: 3 prompts once (3 + 1 + 2 blocks), 12 rows x 2 blocks of 16
    assert sampler.stats.peak_blocks == 3 + 1 + 2 + 12 * 2


def test_no_block_leaks_after_an_exception_mid_generation():
    model = tiny_model("qwen2")
    prompts = make_prompts(LENGTHS)
    sampler = Sampler(model, max_num_seqs=6, kv_cache_gb=pool_gb(model, 10))
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("planted failure")

    hook = model.get_decoder().register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        sampler.generate(prompts, n=3, max_new_tokens=30, temperature=0, stop_token_ids=[])
    hook.remove()
    assert not any(sampler.blocks.refs) and sampler.blocks.num_free == sampler.blocks.capacity
    out = sampler.generate(prompts, n=3, max_new_tokens=30, temperature=0, stop_token_ids=[])
    assert out.completion_ids[::3] == [hf_greedy(model, p, 30) for p in prompts]


def _random_rows(rng: random.Random, prompts: int, n: int) -> list[Row]:
    groups = [Group(i, [1] * rng.randint(1, 40), 0) for i in range(prompts)]
    return [Row(i * n + j, groups[i], 0) for i in range(prompts) for j in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_on_a_random_workload(seed):
    """Without a model: random prompt and completion lengths through a small pool. Every step
    each held block's refcount equals its holders, no block is both free and held, every row
    finishes exactly once with all its tokens, and everything is returned at the end."""
    rng = random.Random(seed)
    n, block_size = rng.choice([1, 3, 5]), rng.choice([4, 16])
    rows = _random_rows(rng, rng.randint(3, 12), n)
    target = {r.index: rng.randint(1, 50) for r in rows}
    need = max(-(-r.group.prefix_len // block_size) + -(-50 // block_size) for r in rows)
    pool = BlockPool(need + 1 + rng.randint(0, 30))
    sched = Scheduler(pool, block_size, rng.choice([2, 4, 64]), rng.choice([8, 10_000]), rows, 8)
    finished = []
    while not sched.done:
        plan = sched.admit()
        for r in plan.rows:
            r.computed = len(r.tokens)
        batch = sched.decode_batch()
        _check_refcounts(pool, sched, rows)
        for r in batch:
            assert r.computed == len(r.tokens) and r.computed < len(r.blocks) * block_size
            r.tokens.append(len(r.tokens))
            r.computed += 1
            if len(r.tokens) == target[r.index]:
                sched.finish(r, "length")
                finished.append(r.index)
    assert sorted(finished) == sorted(target)
    assert all(r.tokens == list(range(target[r.index])) for r in rows)
    pool.check_idle()


def _check_refcounts(pool: BlockPool, sched: Scheduler, rows: list[Row]) -> None:
    expected = [0] * pool.num_blocks
    for r in sched.running:
        for b in r.blocks:
            expected[b] += 1
    for g in {r.group: None for r in rows}:
        if g.resident:
            assert g.holders == g.running + g.held
            for b in g.blocks:
                expected[b] += g.holders
    assert pool.refs == expected
    assert not set(pool.free) & {b for b, c in enumerate(expected) if c}
    assert len(pool.free) + sum(1 for c in expected if c) == pool.capacity


def test_a_prompt_is_prefilled_once_while_its_samples_wait():
    """6 samples of one prompt through 2 decode slots: the group keeps its prompt blocks for the
    samples not admitted yet, so the prompt is prefilled once, not once per pair."""
    model = tiny_model("qwen2")
    prefill_tokens = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: prefill_tokens.append(kw["input_ids"].shape[1]) if kw["input_ids"].shape[0] == 1 and
        kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    sampler = Sampler(model, max_num_seqs=2)
    out = sampler.generate(make_prompts([20]), n=6, max_new_tokens=5, temperature=1.0, stop_token_ids=[], seed=0)
    hook.remove()
    assert prefill_tokens == [19] and sampler.stats.prefills == 1 and sampler.stats.steps == 15
    assert len(out.completion_ids) == 6


def test_pool_exactly_big_enough_for_one_row_runs_one_block_less_refuses():
    """The up-front check: a row alone needs its prompt's blocks (all tokens but the last) and
    max_new_tokens of its own; exactly that runs (one row at a time), one block less is refused
    before any forward."""
    model = tiny_model("qwen2")
    prompts = make_prompts([33])  # 32 cached prompt tokens: 2 blocks; 20 new: 2 blocks
    out = Sampler(model, max_num_seqs=4, kv_cache_gb=pool_gb(model, 2 + 2 + 1)).generate(
        prompts, n=3, max_new_tokens=20, temperature=0, stop_token_ids=[])
    assert out.completion_ids == [hf_greedy(model, prompts[0], 20)] * 3
    with pytest.raises(ValueError, match="prompt 0: 33 tokens \\+ max_new_tokens=20 need 4 K/V blocks .* holds 3"):
        Sampler(model, max_num_seqs=4, kv_cache_gb=pool_gb(model, 2 + 2)).generate(
            prompts, n=3, max_new_tokens=20, temperature=0, stop_token_ids=[])


def test_a_nucleus_larger_than_the_candidates_is_sampled_exactly(monkeypatch):
    """With 4 top-p candidates (far fewer than the nucleus of a near-flat random model) the engine
    sees the nucleus outgrow them, samples those steps again over the whole vocabulary, and gets
    what it gets with candidates to spare; one more host read on such steps."""
    from medix_fast.generate import sampler as engine

    model = tiny_model("qwen2", torch.float32)
    kwargs = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95, stop_token_ids=[], seed=5)
    ref = Sampler(model, max_num_seqs=8).generate(make_prompts([4, 9]), **kwargs)
    monkeypatch.setattr(engine, "PREFILTER", 4)
    sampler = Sampler(model, max_num_seqs=8)
    out = sampler.generate(make_prompts([4, 9]), **kwargs)
    assert out.completion_ids == ref.completion_ids
    assert sampler.stats.syncs == sampler.stats.steps + 1  # the first step finds out, later steps use V


# ------------------------------------------------------------------ stopping
def test_max_new_tokens_reached_by_all_rows_or_by_none():
    model = tiny_model("qwen3", torch.float32)
    prompts = make_prompts([3, 12, 7])
    sampler = Sampler(model, max_num_seqs=5)
    out = sampler.generate(prompts, n=3, max_new_tokens=9, temperature=1.0, stop_token_ids=[], seed=1)
    assert [len(c) for c in out.completion_ids] == [9] * 9 and set(out.finish_reasons) == {"length"}
    stops = list(range(0, VOCAB, 2))  # half the vocabulary: every row stops long before 300 tokens
    out = sampler.generate(prompts, n=3, max_new_tokens=300, temperature=1.0, stop_token_ids=stops, seed=1)
    assert set(out.finish_reasons) == {"stop"} and max(len(c) for c in out.completion_ids) < 300
    assert all(c[-1] in stops and not set(c[:-1]) & set(stops) for c in out.completion_ids)


# ------------------------------------------------------------------ host syncs
@pytest.mark.parametrize("prompts_n,n", [(2, 2), (6, 8)])
def test_decode_loop_syncs_once_per_step(prompts_n, n, monkeypatch):
    """The decode loop reads the device once per step (the sampled tokens), whatever the rows."""
    model = tiny_model("qwen2", torch.float32)
    counted = count_decode_loop(monkeypatch)
    sampler = Sampler(model, max_num_seqs=8, kv_cache_gb=pool_gb(model, 12))
    sampler.generate(make_prompts(LENGTHS[:prompts_n]), n=n, max_new_tokens=20, temperature=1.0,
                     stop_token_ids=[3, 5], seed=0)
    steps = sampler.stats.steps
    assert steps > 20 if prompts_n * n > 8 else steps <= 20
    assert counted["syncs"].count == steps, counted["syncs"].where[:5]


# ------------------------------------------------------------------ compute dtype
def test_sampling_runs_in_the_compute_dtype_when_the_weights_are_fp32():
    """DDP keeps fp32 weights; the engine computes in its dtype (bf16 on CUDA) under one autocast
    for the call, with a pool in that dtype, and leaves the weights as they are."""
    model = tiny_model("qwen2", torch.float32)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    sampler = Sampler(model, max_num_seqs=4, dtype=torch.bfloat16)
    out = sampler.generate(make_prompts([5, 9]), n=2, max_new_tokens=6, temperature=0, stop_token_ids=[])
    hook.remove()
    assert set(seen) == {torch.bfloat16} and sampler.pool.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [len(c) for c in out.completion_ids] == [6] * 4 and all(lp.dtype == torch.float32 for lp in out.logprobs)


# ------------------------------------------------------------------ pool lifetime
def test_pool_is_sized_by_the_call_kept_and_released():
    model = tiny_model("qwen2", torch.float32)
    sampler = Sampler(model, max_num_seqs=4)
    sampler.generate(make_prompts([3]), n=2, max_new_tokens=5, temperature=0, stop_token_ids=[])
    small = sampler.pool
    assert small.num_blocks == 2 * 1 + 1 + 1  # 2 rows x 1 block + the prompt's block + the reserved one
    sampler.generate(make_prompts([3]), n=1, max_new_tokens=5, temperature=0, stop_token_ids=[])
    assert sampler.pool is small, "a big enough pool is kept across calls"
    sampler.generate(make_prompts([3, 40]), n=2, max_new_tokens=40, temperature=0, stop_token_ids=[])
    assert sampler.pool is not small and sampler.pool.num_blocks == 4 * 3 + (1 + 3) + 1  # prompts of 2 and 39 cached tokens
    sampler.release()
    assert sampler.pool is None
