"""The lowest declared versions (``medix_fast/deps.py``) run the project end to end: ``.ci/run``
installs the transformers and triton floors over the test environment and runs this file with
``MEDIX_LOWEST_DEPS=1``; without it every test here is skipped (the normal suite covers the
installed versions). torch's floor (2.11) has no CPU build on this project's machines, so torch
stays the test environment's.

    pip install --target /tmp/lowest transformers==5.6 triton==3.6 "numpy<2.4"   # the floors (deps.FLOORS)
    PYTHONPATH=/tmp/lowest MEDIX_LOWEST_DEPS=1 python -m pytest -q tests/test_lowest_versions.py

numpy < 2.4 beside triton 3.6: its interpreter turns a 1-element array into an int, which numpy 2.4
refuses (compiled GPU kernels never do this; triton 3.9's interpreter no longer does).
"""
from __future__ import annotations

import os

import pytest
import torch
from packaging.version import Version

from medix_fast import deps

pytestmark = pytest.mark.skipif(os.environ.get("MEDIX_LOWEST_DEPS") != "1",
                                reason="set MEDIX_LOWEST_DEPS=1 with the declared floors installed (.ci/run does)")


def test_the_installed_versions_are_the_declared_floors():
    import transformers
    import triton

    assert Version(transformers.__version__) == Version(deps.FLOORS["transformers"])
    assert Version(triton.__version__) == Version(deps.FLOORS["triton"])


def test_a_training_step_of_the_tiny_default(tmp_path):
    from medix_fast.metrics import read_metrics
    from medix_fast.train import main

    assert main(["train.steps=1", "train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=4",
                 "sampling.max_new_tokens=8", "algorithm.chunk_prompts=4", "algorithm.max_tries=1", "eval.every=0",
                 "checkpoint.every=1", "logging.progress=false", f"train.output_dir={tmp_path}"]) == 0
    [record] = read_metrics(tmp_path / "metrics.jsonl")
    assert record["step"] == 1 and 0 <= record["reward/overall"] <= 1


def test_vl_sampler_greedy_equals_generate_with_images():
    """The version-sensitive VL pieces: the PIL image processor, get_rope_index with
    mm_token_type_ids, the cache keyword, transformers' own generate as the reference."""
    from medix_fast.config import DataConfig
    from medix_fast.data import build_prompts, load_examples
    from medix_fast.data.vision import Vision
    from medix_fast.generate import Sampler
    from medix_fast.model.compat import hf_image_kwargs
    from medix_fast.demo.cache import resolve_model_path
    from medix_fast.model.loading import load_image_processor, load_model

    model, tokenizer = load_model(resolve_model_path("tiny-vl"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl")), model.config.image_token_id)
    prompts = build_prompts(load_examples(["sample:train_vl"], DataConfig())[:2], tokenizer, 4096, vision)[0]
    pix = [vision.pixels(p.image) for p in prompts]
    out = Sampler(model, max_num_seqs=2).generate(
        [p.ids for p in prompts], max_new_tokens=8, temperature=0.0, images=pix, stop_token_ids=[])
    for i, (p, b) in enumerate(zip(prompts, pix)):
        x = torch.tensor([p.ids])
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, **hf_image_kwargs(model, x, b.pixel_values, b.image_grid_thw))
        assert out.completion_ids[i] == ref[0, x.shape[1]:].tolist(), i


def test_triton_kernels_on_the_interpreter_match_fp64():
    from medix_fast.kernels import force_backend, fused_linear_logprobs, fused_linear_policy_loss, group_advantages

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 16, generator=g), torch.randn(70, 16, generator=g) / 4
    t, mask = torch.randint(0, 70, (2, 5), generator=g), torch.ones(2, 5)
    ref = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, t[..., None])[..., 0]  # (2, 5)
    with force_backend("triton"):
        logp = fused_linear_logprobs(h, w, t)
        loss, _ = fused_linear_policy_loss(h, w, t, mask, torch.tensor([1.0, -0.5]), loss_type="dapo")
        adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)
    on_policy = -(torch.tensor([1.0, -0.5])[:, None] * mask).sum() / mask.sum()  # ratio 1: -(token mean of A)
    torch.testing.assert_close(loss.double(), on_policy.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adv, torch.tensor([2 ** -0.5, -(2 ** -0.5), 0.0, 0.0]), atol=1e-4, rtol=1e-4)
