"""Tests of the in-process sampler (medix_fast.generate) on tiny random Qwen2, Qwen3 and Llama models
built from transformers configs: greedy parity with ``generate``, the sampling distribution,
log-probs against a full forward, prefix sharing, stopping, the fixed-shape decode step of the
CUDA graphs (run eagerly), reproducibility, model state and bad input. The engine's own
behaviour (continuous batching, preemption, block accounting, batch independence, syncs) is in
tests/test_engine.py.

    pytest tests/test_sampler.py -q
"""
from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from medix_fast.generate import Sampler
from medix_fast.generate.tokens import SamplingParams, sample_tokens, uniforms

VOCAB = 300
ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
         "llama": (LlamaConfig, LlamaForCausalLM)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: with several threads, OpenMP hand-offs cost more than the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str = "qwen2", dtype=torch.float64, seed: int = 0):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256,
                        initializer_range=0.2, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def make_prompts(lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def full_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits (len(completion), V) predicting each completion token, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    return logits[len(prompt) - 1: len(prompt) + len(completion) - 1]


# ------------------------------------------------------------------ greedy parity
@pytest.mark.parametrize("decode_mode", ["eager", "static"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf_generate(arch, decode_mode):
    """Prompts of different lengths, n > 1, fewer decode slots than rows (a prompt's samples
    split between batches), stop tokens (rows leave, waiting rows join), and the fixed-shape step
    of the CUDA graphs."""
    model = tiny_model(arch)
    prompts = make_prompts([5, 1, 9, 3])
    refs = [hf_greedy(model, p, 12) for p in prompts]
    stop = refs[2][4]  # a token greedy decoding emits mid-way: some rows stop, others run to the limit
    refs_stop = [hf_greedy(model, p, 12, eos=stop) for p in prompts]
    sampler = Sampler(model, max_num_seqs=5, decode_mode=decode_mode)
    out = sampler.generate(prompts, n=2, max_new_tokens=12, temperature=0, stop_token_ids=[])
    assert out.completion_ids == [r for r in refs for _ in range(2)]
    out = sampler.generate(prompts, n=2, max_new_tokens=12, temperature=0, stop_token_ids=[stop])
    assert out.completion_ids == [r for r in refs_stop for _ in range(2)]
    assert any(len(r) < 12 for r in refs_stop) and any(len(r) == 12 for r in refs_stop)


# ------------------------------------------------------------------ sampling distribution
@pytest.mark.parametrize("prefilter", [3, 1024])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.8), (0, 0.95)])
def test_sample_tokens_frequencies_and_truncation(top_k, top_p, prefilter):
    """Top-k, then top-p on the renormalised rest; the top-p candidates limited to ``prefilter``
    (3: the nucleus does not fit, ``fits`` says so, the exact answer needs prefilter=V)."""
    logits = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 0.1])
    temperature, n = 0.8, 40_000
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[order[: top_k or 10]] = True  # top-k, then the nucleus of the renormalised rest
    kept = torch.where(allowed, probs, 0) / probs[allowed].sum()
    sorted_kept = kept[order]
    nucleus = (sorted_kept.cumsum(0) - sorted_kept) < top_p
    allowed[order[~nucleus]] = False
    expected = torch.where(allowed, probs, 0) / probs[allowed].sum()

    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, logprobs_mode="processed")
    tokens, logps, fits = sample_tokens(logits.repeat(n, 1), params, u, prefilter)
    nucleus_fits = top_k > 0 or top_p == 1 or allowed.sum() <= prefilter
    assert fits.all() == nucleus_fits and fits.all() == fits.any()
    if not nucleus_fits:
        tokens, logps, fits = sample_tokens(logits.repeat(n, 1), params, u, 10)
        assert fits.all()
    assert allowed[tokens].all(), "a token outside top-k / top-p was sampled"
    torch.testing.assert_close(logps.double(), expected[tokens].log(), rtol=0, atol=1e-5)
    counts = torch.bincount(tokens, minlength=10).double()[allowed]
    exp_counts = n * expected[allowed]
    chi2 = ((counts - exp_counts) ** 2 / exp_counts).sum().item()
    df = int(allowed.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6, f"chi-square {chi2:.1f} on {df} degrees of freedom"


def test_one_step_sampler_frequencies():
    """First tokens of many samples of one prompt follow softmax(logits / T) of the model."""
    model = tiny_model("qwen2", torch.float32)
    prompt = make_prompts([6])[0]
    temperature, n = 1.3, 12_000
    out = Sampler(model, max_num_seqs=4000).generate(
        [prompt], n=n, max_new_tokens=1, temperature=temperature, stop_token_ids=[], seed=3)
    probs = torch.softmax(full_logits(model, prompt, [0])[0] / temperature, -1)
    counts = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=VOCAB).double()
    expected = n * probs
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < (VOCAB - 1) + 6 * math.sqrt(2 * (VOCAB - 1)), f"chi-square {chi2:.1f} on {VOCAB - 1} dof"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.8), (0.0, 0, 1.0)])
def test_cpp_sampling_step_draws_the_same_tokens(temperature, top_k, top_p):
    """The C++ step (the CPU path at large vocabularies) and the PyTorch one share their truncation
    and inverse CDF: the same uniforms give the same tokens and raw log-probs."""
    from medix_fast.kernels import cpp, force_backend

    if not cpp.available():
        pytest.skip(f"C++ ops unavailable: {cpp.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    logits, u = torch.randn(32, 3000, generator=g) * 3, torch.rand(32, generator=g)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    with force_backend("torch"):
        ref, ref_lp, fits = sample_tokens(logits, params, u, 3000)
    with force_backend("cpp"):
        tok, lp, _ = sample_tokens(logits, params, u)
    assert fits.all() and torch.equal(tok, ref)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)


def test_greedy_picks_first_max_and_logprob():
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0]])
    u = torch.zeros(1)
    tokens, logps, _ = sample_tokens(logits, SamplingParams(temperature=0), u)
    assert tokens.tolist() == [1]
    torch.testing.assert_close(logps, torch.log_softmax(logits, -1)[:, 1])
    _, logps, _ = sample_tokens(logits, SamplingParams(temperature=0, logprobs_mode="processed"), u)
    assert logps.tolist() == [0.0]


def test_uniforms_are_a_function_of_key_and_step():
    """Counter-based noise: the same (key, step) gives the same number whatever else is in the
    batch; different keys or steps give independent-looking uniform numbers."""
    keys = torch.arange(4000) * 7919 + 13
    steps = torch.arange(4000) % 37
    u = uniforms(keys, steps)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    order = torch.randperm(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniforms(keys[order], steps[order]), u[order])
    assert torch.equal(uniforms(keys[:3], steps[:3]), u[:3])
    counts = torch.histc(u, bins=10, min=0, max=1)
    chi2 = ((counts - 400) ** 2 / 400).sum().item()
    assert chi2 < 9 + 6 * math.sqrt(18), chi2
    same_key = uniforms(torch.full((1000,), 5), torch.arange(1000))
    assert len(set(same_key.tolist())) > 990, "steps of one row repeat their noise"


# ------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.9)])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_logprobs_match_full_forward(arch, top_k, top_p):
    model = tiny_model(arch, torch.float32)
    prompts = make_prompts([7, 2, 4])
    temperature = 0.7
    sampler = Sampler(model, max_num_seqs=6)
    kwargs = dict(n=3, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=[7, 11],
                  seed=5)
    raw = sampler.generate(prompts, **kwargs)
    processed = sampler.generate(prompts, logprobs_mode="processed", **kwargs)
    assert raw.completion_ids == processed.completion_ids
    for row, completion in enumerate(raw.completion_ids):
        logits = full_logits(model, prompts[row // 3], completion) / temperature  # (L, V)
        chosen = torch.tensor(completion)
        truncated = _truncate(logits, top_k, top_p)
        assert truncated.gather(-1, chosen[:, None]).isfinite().all(), "a token outside top-k / top-p was sampled"
        expect_raw = torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0]
        expect_proc = torch.log_softmax(truncated, -1).gather(-1, chosen[:, None])[:, 0]
        assert raw.logprobs[row].dtype == torch.float32
        torch.testing.assert_close(raw.logprobs[row].double(), expect_raw, rtol=0, atol=2e-5)
        torch.testing.assert_close(processed.logprobs[row].double(), expect_proc, rtol=0, atol=2e-5)


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """fp64 reference of top-k then top-p (ties kept), by a full sort: excluded logits -> -inf."""
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p >= top_p).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p >= top_p))
    return logits.masked_fill(drop, float("-inf"))


# ------------------------------------------------------------------ prefix sharing, static decode
def test_static_decode_step_matches_eager():
    """The fixed-shape, bucketed step of the CUDA graphs (run eagerly) samples what the eager step does."""
    model = tiny_model("qwen2")
    prompts = make_prompts([4, 8, 1, 6, 3])
    kwargs = dict(n=3, max_new_tokens=14, temperature=1.0, top_p=0.9, stop_token_ids=[3, 5, 8], seed=11)
    ref = Sampler(model, max_num_seqs=7).generate(prompts, **kwargs)
    out = Sampler(model, max_num_seqs=7, decode_mode="static").generate(prompts, **kwargs)
    assert out.completion_ids == ref.completion_ids
    assert out.finish_reasons == ref.finish_reasons
    for a, b in zip(out.logprobs, ref.logprobs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("compute", [torch.bfloat16, None])
def test_static_decoder_kept_across_calls_sees_each_weight_update(compute):
    """One static decoder serves every call, under autocast too (fp32 weights, bf16 compute): it
    reads the engine's buffers (the addresses its CUDA graphs hold, the same in every call),
    refreshed in place at each call, so an in-place update between calls (an optimizer step) is
    sampled from at once: tokens and log-probs equal the eager step's (autocast's own copies) in
    each of 3 calls. The model's parameters are the same objects, untouched, after."""
    model = tiny_model("qwen2", torch.float32)
    params = [(n, p, p.dtype) for n, p in model.named_parameters()]
    static = Sampler(model, max_num_seqs=4, decode_mode="static", dtype=compute)
    eager = Sampler(model, max_num_seqs=4, dtype=compute)
    q_proj = model.model.layers[0].self_attn.q_proj
    read = []
    hook = q_proj.register_forward_pre_hook(lambda m, args: read.append((m.weight.data_ptr(), m.weight.dtype)))
    kwargs = dict(n=2, max_new_tokens=6, temperature=1.0, stop_token_ids=[], seed=3)
    outs = []
    for call in range(3):
        if call:
            with torch.no_grad():  # an optimizer step: in place
                for _, p, _ in params:
                    p.add_(torch.randn_like(p), alpha=0.1)
        read.clear()
        out = static.generate(make_prompts([4, 7]), **kwargs)
        seen = set(read)
        ref = eager.generate(make_prompts([4, 7]), **kwargs)
        assert out.completion_ids == ref.completion_ids
        for a, b in zip(out.logprobs, ref.logprobs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        outs.append((out.completion_ids, seen))
    assert outs[0][0] != outs[1][0] != outs[2][0], "each update changes the samples"
    single = {**kwargs, "n": 1}  # narrower groups (an evaluation's) in the same decoder
    assert static.generate(make_prompts([5]), **single).completion_ids == \
        eager.generate(make_prompts([5]), **single).completion_ids
    assert static.decoders_built == 1
    # q_proj reads one address in every call: the engine's bf16 buffer under autocast (autocast
    # casts nothing), its own parameter when already in the compute dtype
    own = [buf for m, name, buf in static.weights.slots if m is q_proj and name == "weight"] or [q_proj.weight]
    assert outs[0][1] == outs[1][1] == outs[2][1] == {(own[0].data_ptr(), compute or torch.float32)}
    hook.remove()
    assert [(n, p, p.dtype) for n, p in model.named_parameters()] == params


def test_prefill_once_per_prompt_and_finished_rows_leave_the_batch():
    model = tiny_model("qwen2")
    prompts = make_prompts([5, 3, 7])
    batch_sizes = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, args, kw: batch_sizes.append(kw["input_ids"].shape), with_kwargs=True)
    refs = [hf_greedy(model, p, 10) for p in prompts]
    batch_sizes.clear()
    stop = refs[0][2]
    out = Sampler(model, max_num_seqs=16).generate(
        prompts, n=4, max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    hook.remove()
    assert batch_sizes[0] == (1, 4 + 2 + 6), "each prompt (but its last token) is prefilled once, packed"
    lengths = [len(c) for c in out.completion_ids]
    decode_rows = [s[0] for s in batch_sizes[1:]]
    for step, rows in enumerate(decode_rows):  # decode step `step` produces completion token `step`
        assert rows == sum(n > step for n in lengths), "only unfinished rows are decoded"
    assert decode_rows[-1] < decode_rows[0]


# ------------------------------------------------------------------ stopping
def test_stop_tokens_length_limit_and_finish_reasons():
    model = tiny_model("llama", torch.float32)
    prompts = make_prompts([3, 6])
    sampler = Sampler(model, max_num_seqs=8)
    stops = [1, 2, 4, 9, 17, 23]
    out = sampler.generate(prompts, n=4, max_new_tokens=40, temperature=1.5, stop_token_ids=stops, seed=2)
    assert len(out.completion_ids) == len(out.logprobs) == len(out.finish_reasons) == 8
    for ids, lp, reason in zip(out.completion_ids, out.logprobs, out.finish_reasons):
        assert len(ids) == len(lp) and 1 <= len(ids) <= 40
        assert not set(ids[:-1]) & set(stops), "a completion runs past a stop token"
        assert (reason == "stop") == (ids[-1] in stops)
        assert reason == "stop" or len(ids) == 40
    assert "stop" in out.finish_reasons
    model.generation_config.eos_token_id = 9
    default = sampler.generate(prompts, n=4, max_new_tokens=40, temperature=1.5, seed=2)
    explicit = sampler.generate(prompts, n=4, max_new_tokens=40, temperature=1.5, stop_token_ids=[9], seed=2)
    assert default.completion_ids == explicit.completion_ids
    off = sampler.generate(prompts, n=4, max_new_tokens=40, temperature=1.5, stop_token_ids=[], seed=2)
    assert all(len(c) == 40 for c in off.completion_ids) and set(off.finish_reasons) == {"length"}


def test_seeded_reproducibility():
    model = tiny_model("qwen3", torch.float32)
    prompts = make_prompts([4, 9])
    sampler = Sampler(model, max_num_seqs=4)
    kwargs = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=[])
    a, b = sampler.generate(prompts, seed=7, **kwargs), sampler.generate(prompts, seed=7, **kwargs)
    assert a.completion_ids == b.completion_ids
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert sampler.generate(prompts, seed=8, **kwargs).completion_ids != a.completion_ids
    torch.manual_seed(0)
    c = sampler.generate(prompts, **kwargs)
    torch.manual_seed(0)
    assert sampler.generate(prompts, **kwargs).completion_ids == c.completion_ids
    assert len(set(map(tuple, a.completion_ids[:3]))) > 1, "the samples of one prompt differ"


def test_the_noise_depends_on_the_prompt_not_only_the_sample_index():
    """Two copies of one prompt: row j of each draws its own noise (key (i * n + j)), so they differ."""
    model = tiny_model("qwen3", torch.float32)
    prompts = make_prompts([6]) * 2
    out = Sampler(model, max_num_seqs=4).generate(prompts, n=2, max_new_tokens=12, temperature=1.0,
                                                  stop_token_ids=[], seed=7)
    assert out.completion_ids[:2] != out.completion_ids[2:]


# ------------------------------------------------------------------ model state, wrappers, memory
def test_model_state_grad_and_memory():
    model = tiny_model("qwen2", torch.float32)
    model.train()
    model.model.layers[0].mlp.eval()
    attn = model.config._attn_implementation
    flags = [m.training for m in model.modules()]
    prompts = make_prompts([5, 2])
    sampler = Sampler(model, max_num_seqs=4)
    kwargs = dict(n=2, max_new_tokens=8, temperature=1.0, stop_token_ids=[], seed=0)
    out = sampler.generate(prompts, **kwargs)
    assert [m.training for m in model.modules()] == flags
    assert model.config._attn_implementation == attn
    assert all(p.grad is None for p in model.parameters())
    assert not any(lp.requires_grad for lp in out.logprobs)
    with torch.inference_mode():
        in_inference = sampler.generate(prompts, **kwargs)
    with torch.no_grad():
        in_no_grad = sampler.generate(prompts, **kwargs)
    assert in_inference.completion_ids == in_no_grad.completion_ids == out.completion_ids
    (out.logprobs[0] * 2).sum()  # usable in ordinary autograd code (not an inference tensor)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # touching some modules' deprecated attributes warns
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    sampler.generate(prompts, **kwargs)
    before = live_tensors()
    for _ in range(3):
        sampler.generate(prompts, **kwargs)
    assert live_tensors() == before


def test_wrapped_model_is_unwrapped():
    class Wrapper(torch.nn.Module):  # stands for DDP / FSDP, which keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llama")
    prompts = make_prompts([3, 5])
    kwargs = dict(n=2, max_new_tokens=6, temperature=0, stop_token_ids=[])
    plain = Sampler(model, max_num_seqs=4).generate(prompts, **kwargs)
    wrapped = Sampler(Wrapper(model), max_num_seqs=4).generate(prompts, **kwargs)
    assert wrapped.completion_ids == plain.completion_ids


def test_follows_weight_updates():
    """The sampler reads the live parameters: an in-place update changes the next call's output."""
    model = tiny_model("qwen2")
    prompts = make_prompts([4])
    sampler = Sampler(model, max_num_seqs=2)
    before = sampler.generate(prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    with torch.no_grad():
        model.lm_head.weight[before.completion_ids[0][0]] -= 100.0
    after = sampler.generate(prompts, max_new_tokens=8, temperature=0, stop_token_ids=[])
    assert after.completion_ids[0] == hf_greedy(model, prompts[0], 8) != before.completion_ids[0]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "prompt_ids is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 2], [3] * 40], {"max_new_tokens": 7}, r"prompt 1: 40 tokens \+ max_new_tokens=7 need 4 K/V blocks of 16 "
                                                r"tokens \(32.0 KiB\) but the pool holds 2 \(16.0 KiB"),
    ([[1, 2], [3, VOCAB]], {}, f"prompt 1: token {VOCAB} at position 1"),
    ([[-1, 2]], {}, "prompt 0: token -1 at position 0"),
    ([[1, 2.5]], {}, "prompt 0: token 2.5 at position 1"),
    ([[1]], {"n": 0}, "n must be"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"top_k": -2}, "top_k"),
    ([[1]], {"logprobs_mode": "sampled"}, "logprobs_mode"),
    ([[1]], {"stop_token_ids": [VOCAB + 5]}, "stop_token_ids"),
])
def test_bad_input_raises_before_compute(prompts, kwargs, match):
    model = tiny_model("qwen2", torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    sampler = Sampler(model, max_num_seqs=4, kv_cache_gb=3 * 16 * 512 / 2**30)  # 3 blocks: 2 usable
    with pytest.raises(ValueError, match=match):
        sampler.generate(prompts, **{"max_new_tokens": 4, **kwargs})
    assert not calls


def test_bad_construction():
    model = tiny_model("qwen2", torch.float32)
    with pytest.raises(ValueError, match="decode_mode"):
        Sampler(model, decode_mode="graph")
    with pytest.raises(ValueError, match="block_size"):
        Sampler(model, block_size=24)
    with pytest.raises(ValueError, match="tl.dot needs 16 tokens"):
        Sampler(model, block_size=8)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Sampler(model, max_num_seqs=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Sampler(model, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        Sampler(model, decode_mode="cuda_graph").generate([[1]], max_new_tokens=2)
