"""No deprecation warning on a normal run: a policy update (text and VL, through the K/V-cache
paths), the compat choices it rests on, and a whole training step, each with every
DeprecationWarning / FutureWarning turned into an error, wherever it is raised (transformers
attributes its keyword deprecations to torch's module call, so pytest.ini's per-module filters
alone would not see them), and transformers' logged deprecations counted too.

    pytest tests/test_warnings.py
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from medix_fast.config import DataConfig
from medix_fast.data import build_prompts, load_examples
from medix_fast.data.vision import Vision
from medix_fast.model.compat import cache_keyword, cache_kwargs, hf_image_kwargs
from medix_fast.model.forward import continuation_hidden_states, prompt_hidden_states
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.rl.batch import Sequences, collate
from medix_fast.rl.update import PolicyObjective
from medix_fast.train import main


@contextlib.contextmanager
def no_deprecations():
    """Fail on any DeprecationWarning / FutureWarning, and on a deprecation logged by transformers
    (its ``warning_once`` cache cleared first, so an earlier test cannot hide one)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", FutureWarning)
            yield
    finally:
        logger.removeHandler(handler)
    logged = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not logged, logged


def test_no_deprecations_catches_a_warning_and_a_logged_deprecation():
    with pytest.raises(FutureWarning), no_deprecations():
        warnings.warn("`x` is deprecated", FutureWarning)
    with pytest.raises(AssertionError, match="deprecated"), no_deprecations():
        logging.getLogger("transformers.modeling_utils").warning_once("`past_key_values` is deprecated")


def test_cache_keyword_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    assert cache_kwargs(torch.compile(New()), 1) == {"cache": 1}  # looked through the compile wrapper
    decoder = tiny_model().model
    assert cache_keyword(decoder) in inspect.signature(decoder.forward).parameters


def tiny_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_policy_update_through_the_shared_prompt_cache_warns_nothing():
    model = tiny_model()
    g = 2
    prompts, comps = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], [[10, 11], [12], [13, 14, 15], [16]]
    seqs = Sequences(prompts, comps, [torch.zeros(len(c)) for c in comps], torch.tensor([1.0, -1.0, 0.5, -0.5]), g)
    mb = collate(seqs, [0, 1], 0, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with no_deprecations():
        loss, _ = PolicyObjective(model, 1.0, share_prompt=True)(mb, {"loss_type": "dapo"})
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


def test_vl_prompt_cache_and_reference_generate_warn_nothing():
    """The image path: multimodal positions, the vision tower and the cache, then transformers'
    own generate with the inputs the reference comparisons give it."""
    model, tokenizer = load_model(resolve_model_path("tiny-vl"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl")), model.config.image_token_id)
    prompt = build_prompts(load_examples(["sample:train_vl"], DataConfig())[:1], tokenizer, 4096, vision)[0][0]
    pix = vision.pixels(prompt.image)
    ids = torch.tensor([prompt.ids])  # (1, P)
    with torch.no_grad(), no_deprecations():
        cache = DynamicCache()
        _, start = prompt_hidden_states(model, ids, torch.ones_like(ids), cache, pixel_values=pix.pixel_values,
                                        image_grid_thw=pix.image_grid_thw)
        continuation_hidden_states(model, torch.tensor([[30]]), torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
                                   start, cache)  # (1, 1, H)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       **hf_image_kwargs(model, ids, pix.pixel_values, pix.image_grid_thw))


def test_a_training_step_warns_nothing(tmp_path):
    """A whole step of the tiny default (rollout through the sampler, rewards, update, scheduler)."""
    with no_deprecations():
        assert main(["train.steps=1", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "sampling.group_size=2",
                     "sampling.max_new_tokens=4", "algorithm.chunk_prompts=2", "algorithm.max_tries=1",
                     "eval.every=0", "checkpoint.every=0", "logging.progress=false",
                     f"train.output_dir={tmp_path}"]) == 0
