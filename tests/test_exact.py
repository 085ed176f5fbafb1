"""``sampling.exact`` (``model/exact.py``, ``kernels/exact.py``): the batch-invariant pieces give a
row's result whatever shares its call, and bf16 training steps of the tiny dense models (text, VL)
on the CPU have a sampler whose every log-prob equals the trainer's recompute bit for bit; the
mixture-of-experts model with routing replay reports what remains (docs/mismatch.md#exact-mode).

Run: pytest tests/test_exact.py
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from medix_fast.config import load_config
from medix_fast.kernels import exact, force_backend
from medix_fast.train import Trainer

SMALL = ["eval.every=0", "train.prompts_per_step=4", "train.mini_batch_prompts=4", "sampling.group_size=4",
         "sampling.max_new_tokens=16", "algorithm.dynamic_sampling=false", "checkpoint.every=0",
         "logging.tensorboard=false", "logging.plot=false", "logging.progress=false",
         "model.dtype=bfloat16", "sampling.exact=true"]


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_alone_equals_the_row_in_any_batch(dtype, tiles):
    """Rows 0 and 5 of a 70-row batch, alone and in batches of 2 and 19: linear, LM head,
    log-softmax; the GEMMs as the probe chose (fp32 here: tiles) and in tiles."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((70, 128), (384, 128), (384,)))
    with exact.tiles_forced() if tiles else contextlib.nullcontext():
        full, logits = exact.linear(x, w, b), exact.head_logits(x, w)  # (70, 384), (70, 384) fp32
        targets = torch.randint(0, 384, (70,), generator=g)
        logp = exact.token_logprobs(logits, targets, 1 / 0.7)
        check(x, w, b, full, logits, targets, logp)


def check(x, w, b, full, logits, targets, logp):
    for rows in ([0], [5], [5, 0], list(range(19))):
        assert torch.equal(exact.linear(x[rows], w, b), full[rows]), rows
        assert torch.equal(exact.head_logits(x[rows], w), logits[rows]), rows
        assert torch.equal(exact.token_logprobs(logits[rows], targets[rows], 1 / 0.7), logp[rows]), rows


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_a_query_alone_equals_the_query_among_others_and_padding(backend):
    """Query 3 of sequence 1, with its keys alone (no padding) and inside a batch of 3 sequences
    padded to 24 keys with other values: the same bits, on the C++ op and in PyTorch."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 10, 4, 32, generator=g).bfloat16()  # (S, Tq, H, D), GQA 4 heads / 2 kv
    k, v = (torch.randn(3, 24, 2, 32, generator=g).bfloat16() for _ in range(2))  # (S, L, kv, D)
    seen = torch.randint(0, 14, (3, 10), generator=g)
    seen[1, 3] = 13
    with force_backend(backend):
        full = exact.attention(q, k, v, seen, 0.17)  # (3, 10, 4, 32)
        alone = exact.attention(q[1:2, 3:4], k[1:2, :13], v[1:2, :13], seen[1:2, 3:4], 0.17)
    assert torch.equal(alone[0, 0], full[1, 3])
    assert not full[seen == 0].any()  # a query that sees nothing: 0


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_attention_and_its_gradients_are_softmax_attention(backend):
    """Against fp64 causal softmax attention (GQA, a query that sees nothing): output and gradients
    within fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, 6, 4, 32), (2, 7, 2, 32), (2, 7, 2, 32)))
    seen = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 7]])
    with force_backend(backend):
        out = exact.attention(q, k, v, seen, 0.3)  # (2, 6, 4, 32) fp32
    scores = torch.einsum("sqhd,slhd->shql", q, k.repeat_interleave(2, 2)) * 0.3
    p = scores.masked_fill(torch.arange(7) >= seen[:, None, :, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    ref = torch.einsum("shql,slhd->sqhd", p, v.repeat_interleave(2, 2))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.float()), torch.autograd.grad(ref, (q, k, v), grad)):
        assert (got - want).abs().max() < 1e-5
    assert (out - ref).abs().max() < 1e-6


@pytest.mark.parametrize("autocast", [False, True])
def test_the_models_lm_head_in_exact_mode_gives_a_row_alone_its_bits_in_a_batch(autocast):
    """``model.forward.head_logits`` (the sampler's and the trainer's LM head) of a model in exact
    mode: row 3 alone and among 37 (fp32: MKL's GEMM takes another kernel for one row)."""
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.model import exact as model_exact
    from medix_fast.model.forward import head_logits
    from medix_fast.model.loading import load_model

    model, _ = load_model(resolve_model_path("tiny"))
    model_exact.enable(model)
    h = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        assert torch.equal(head_logits(model, h[3:4]), head_logits(model, h)[3:4])


def steps(tmp_path, overrides: list[str], n: int) -> list[dict]:
    t = Trainer(load_config(None, [f"train.output_dir={tmp_path}", *SMALL, *overrides]))
    return [t.train_step() for _ in range(n)]


@pytest.mark.parametrize("model, overrides, kinds", [
    ("tiny", ["tiles"], ()),
    ("tiny-vl", ["data.train_files=[sample:train, sample:train_vl]", "data.min_pixels=784", "data.max_pixels=12544",
                 "train.seed=1", "train.prompts_per_step=8", "train.mini_batch_prompts=8", "sampling.group_size=2"],
     ("text", "image")),
])
def test_bf16_sampler_log_probs_equal_the_trainers_bit_for_bit(tmp_path, model, overrides, kinds):
    """Three steps: over every sampled token, max |sampler - recompute| is 0 (and per prompt kind
    where a step has both; the VL run's first one does). The text model's GEMMs all in tiles, the
    VL model's as the probe chose."""
    tiles = "tiles" in overrides
    with exact.tiles_forced() if tiles else contextlib.nullcontext():
        records = steps(tmp_path, [f"model.path={model}", *(o for o in overrides if o != "tiles")], n=3)
    for r in records:
        assert r["optimizer_steps"] == 1
        for prefix in ("mismatch/", *(f"mismatch/{k}/" for k in kinds if f"mismatch/{k}/abs_max" in r)):
            assert r[f"{prefix}abs_max"] == 0 and r[f"{prefix}abs_mean"] == 0, (prefix, r[f"{prefix}abs_max"])
    assert all(f"mismatch/{k}/abs_max" in records[0] for k in kinds)


def test_moe_with_routing_replay_reports_its_residual(tmp_path):
    """The experts' grouped GEMMs are not made invariant: not required to be 0, only measured."""
    (r,) = steps(tmp_path, ["model.path=tiny-moe", "model.router_replay=true"], n=1)
    assert math.isfinite(r["mismatch/abs_max"]) and r["mismatch/abs_max"] >= 0
    print(f"tiny-moe, exact, routing replay: mismatch/abs_max {r['mismatch/abs_max']:.3g}, "
          f"abs_mean {r['mismatch/abs_mean']:.3g}")


def test_every_linear_and_the_patch_embedding_of_vl_go_through_the_invariant_gemm(monkeypatch):
    """A VL sampler call (vision tower, prefill, decode) in exact mode: every ``nn.Linear`` weight but
    the LM head's (``head_logits``) and the patch embedding's reach ``kernels.exact.linear``."""
    from medix_fast.config import DataConfig
    from medix_fast.data import build_prompts, load_examples
    from medix_fast.data.vision import Vision, load_image
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.generate import Sampler
    from medix_fast.model import exact as model_exact
    from medix_fast.model.loading import load_image_processor, load_model

    path = resolve_model_path("tiny-vl")
    model, tokenizer = load_model(path)
    vision = Vision(load_image_processor(path), model.config.image_token_id)
    prompt = build_prompts(load_examples(["sample:train_vl"], DataConfig())[:1], tokenizer, 4096, vision)[0][0]
    model_exact.enable(model)
    seen, real = set(), exact.linear
    monkeypatch.setattr(exact, "linear", lambda x, w, b=None: seen.add(w.data_ptr()) or real(x, w, b))
    Sampler(model, kv_cache_gb=0.01).generate([prompt.ids], n=2, max_new_tokens=3, seed=0,
                                               images=[vision.encode([load_image(prompt.image)])])
    head = model.get_output_embeddings()
    gemms = {name: m.weight.data_ptr() for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and m is not head}
    assert any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    assert [name for name, ptr in gemms.items() if ptr not in seen] == []


def test_preempted_and_continued_rows_give_one_calls_log_probs_bit_for_bit():
    """The prefill of a recomputed row (its prompt's cached blocks, then its own tokens) takes the
    decode's maths: with a pool that preempts, and with rows continued from their first 9 tokens,
    the same tokens and bitwise the same log-probs as one uninterrupted bf16 call."""
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.generate import Sampler
    from medix_fast.model import exact as model_exact
    from medix_fast.model.loading import load_model

    model, tokenizer = load_model(resolve_model_path("tiny"))
    model_exact.enable(model)
    prompts = [tokenizer(t)["input_ids"] for t in ("Patient with a finding in the left lung; what is the diagnosis?",
                                                   "CT of the head shows")]
    call = dict(n=3, max_new_tokens=24, seed=1, stop_token_ids=[])
    ref = Sampler(model, dtype=torch.bfloat16).generate(prompts, **call)
    tight = Sampler(model, dtype=torch.bfloat16, max_num_seqs=2, kv_cache_gb=0.00012)
    runs = [tight.generate(prompts, **call)]
    assert tight.stats.preemptions > 0
    runs.append(Sampler(model, dtype=torch.bfloat16).generate(
        prompts, **call, continued=[(ids[:9], lp[:9]) for ids, lp in zip(ref.completion_ids, ref.logprobs)]))
    for out in runs:
        assert out.completion_ids == ref.completion_ids
        assert all(torch.equal(a, b) for a, b in zip(out.logprobs, ref.logprobs))
