"""Sampling with LoRA adapters (``sampling.lora_merge``, generate/weights.py): merged into the engine's
weight buffers or run as the low-rank add, greedy tokens equal to HF + PEFT ``generate`` (tiny-VL with
images; tiny and tiny-MoE in tests/test_lora.py), and the static decoder (the CUDA graphs' step, run
eagerly on the CPU) kept across optimizer steps sampling from the new adapters each time, and the two
ways' costs on paper (generate/lora_traffic.py). The tensor-parallel copy with adapters is tested on
2 ranks in tests/test_tensor_parallel.py."""
from __future__ import annotations

import pytest
import torch

from medix_fast.config import DataConfig, LoraConfig, load_config
from medix_fast.data import build_prompts, load_examples
from medix_fast.data.vision import Vision, load_image
from medix_fast.demo.cache import resolve_model_path
from medix_fast.generate import Sampler
from medix_fast.generate.weights import merged_adapters
from medix_fast.model.compat import hf_image_kwargs
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.model.lora import adapter_parameters, adapters
from medix_fast.model.peft_files import write_adapter

peft = pytest.importorskip("peft")
from test_lora import adapted  # noqa: E402


def test_lora_merge_setting_picks_the_adapters_to_merge():
    """true and false force every kind; auto takes weights.MERGE_AUTO's choice per kind (linear, experts)."""
    from medix_fast.generate.weights import MERGE_AUTO

    model, _ = adapted("tiny-moe", LoraConfig(rank=2, alpha=4, experts=True))
    every = adapters(model)
    assert merged_adapters(model, True) == every and merged_adapters(model, False) == []
    assert merged_adapters(model, "auto") == [m for m in every if MERGE_AUTO[type(m)]]
    assert load_config(None, ["sampling.lora_merge=false"]).sampling.lora_merge is False
    assert load_config(None, []).sampling.lora_merge == "auto"


def test_tiny_vl_greedy_equals_peft_generate_with_images(tmp_path):
    """tiny-VL with adapters on the language model's linears, an image in the prompt: the engine's
    greedy tokens, merged (fp32) and as the low-rank add, equal HF + PEFT ``generate``'s."""
    lora = LoraConfig(rank=4, alpha=8)
    model, tokenizer = adapted("tiny-vl", lora, seed=2)
    path = resolve_model_path("tiny-vl")
    write_adapter(model, lora, "base", tmp_path)
    reference = peft.PeftModel.from_pretrained(load_model(path)[0], tmp_path).eval()
    vision = Vision(load_image_processor(path), model.config.image_token_id)
    prompt = build_prompts(load_examples(["sample:train_vl"], DataConfig())[:1], tokenizer, 4096, vision)[0][0]
    pix = vision.encode([load_image(prompt.image)])
    x = torch.tensor([prompt.ids])
    with torch.no_grad():
        expected = reference.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10,
                                      do_sample=False, eos_token_id=None, pad_token_id=0,
                                      **hf_image_kwargs(model, x, pix.pixel_values, pix.image_grid_thw))
    for merge in (True, False):
        sampler = Sampler(model, max_num_seqs=4, lora_merge=merge)
        out = sampler.generate([prompt.ids], n=1, max_new_tokens=10, temperature=0, images=[pix], stop_token_ids=[])
        assert (sampler.weights is not None) == merge  # merged: the engine's buffers even in eager mode
        assert out.completion_ids[0] == expected[0, x.shape[1]:].tolist(), merge


@pytest.mark.parametrize("merge", [True, False])
def test_static_decoder_kept_across_steps_samples_the_new_adapters(merge):
    """tiny-MoE with adapters on its linears and expert banks, the static decoder (the CUDA graphs'
    fixed-shape step) kept across 3 calls with an in-place update of the adapters between them (an
    optimizer step): each call's tokens and log-probs equal a fresh eager low-rank sampler's on the
    updated adapters, the tokens change with each update, one decoder is built, and the model's
    parameters and adapter flags are as they were after every call."""
    model, _ = adapted("tiny-moe", LoraConfig(rank=4, alpha=8, experts=True), seed=3)
    static = Sampler(model, max_num_seqs=4, decode_mode="static", lora_merge=merge)
    before = [(n, p) for n, p in model.named_parameters()]
    kwargs = dict(n=2, max_new_tokens=8, temperature=1.0, stop_token_ids=[], seed=5)
    prompts = [[3, 9, 27, 81, 4], [7, 49, 2]]
    outs = []
    for call in range(3):
        if call:
            with torch.no_grad():  # the optimizer's in-place update of the adapters
                for p in adapter_parameters(model):
                    p.add_(torch.randn_like(p), alpha=0.2)
        out = static.generate(prompts, **kwargs)
        static.release(keep=True)  # the trainer keeps the sampler across the update
        ref = Sampler(model, max_num_seqs=4, lora_merge=False).generate(prompts, **kwargs)
        assert out.completion_ids == ref.completion_ids, call
        for a, b in zip(out.logprobs, ref.logprobs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        outs.append(out.completion_ids)
        assert [(n, p) for n, p in model.named_parameters()] == before
        assert all(m.enabled for m in adapters(model))
    assert outs[0] != outs[1] != outs[2], "each update changes the samples"
    assert static.decoders_built == 1
    slots = {(id(m), n) for m, n, _ in static.weights.slots}
    expert = adapters(model)[-1].base_layer
    assert ((id(expert), "gate_up_proj") in slots) == merge  # merged: the bank's buffer, read at a fixed address


def test_the_two_ways_on_paper_at_the_shipped_shapes():
    """generate/lora_traffic.py: the adapted parameters of the 8B and the 30B-A3B by hand; the low-rank
    add of the 30B's expert banks rewrites them every step (28 bytes per expert parameter, more than
    the step's own traffic ten times over), its linears add a fraction; merging is 2 bytes a parameter."""
    from medix_fast.generate.decode_shapes import shipped
    from medix_fast.generate.lora_traffic import FOLD_BYTES, adapted, cost, table

    shapes = {s.model: s for s in shipped()}
    dense = adapted("Qwen3-VL-8B-Instruct")
    assert dense.parameters == 36 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288) and not dense.banks
    moe = adapted("Qwen3-VL-30B-A3B-Thinking")
    experts = 48 * 128 * 3 * 2048 * 768
    assert moe.parameters == 48 * 2 * (2048 * 4096 + 2048 * 512) + experts
    c = cost(shapes["Qwen3-VL-30B-A3B-Thinking"], moe, 64, 16)
    assert c.add_bytes > FOLD_BYTES * experts > 10 * c.base and c.buffers == 2 * moe.parameters
    d = cost(shapes["Qwen3-VL-8B-Instruct"], dense, 64, 16)
    assert 0 < d.add_bytes < 0.1 * d.base and d.add_launches == 4 * 7 * 36
    assert "medix_r1_8b_dapo" in table(16)
