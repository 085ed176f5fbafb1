"""Vision-language support on the tiny Qwen2.5-VL (``ensure_tiny_model(vl=True)``): loading, the
sample images, image columns and their errors, multimodal positions, sampler parity with
``generate`` and a training step through the vision tower.

    pytest tests/test_vl.py
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medix_fast.demo import sample_images
from medix_fast.config import DataConfig
from medix_fast.data import DataError, Example, build_prompts, load_examples
from medix_fast.model.compat import hf_image_kwargs
from medix_fast.model.forward import hidden_states, lm_head, mrope_positions
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.data.loader import SAMPLE_DIR as DATA_DIR
from medix_fast.generate import Sampler
from medix_fast.data.vision import Vision, expand_image_tokens, load_image


@pytest.fixture(scope="module")
def vl():
    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model_path("tiny-vl"))
    vision = Vision(load_image_processor(resolve_model_path("tiny-vl")), model.config.image_token_id)
    return model, tokenizer, vision


@pytest.fixture(scope="module")
def prompts(vl):
    _, tokenizer, vision = vl
    examples = load_examples(["sample:train_vl"], DataConfig())
    return build_prompts(examples[::8], tokenizer, 4096, vision)[0]  # 4 prompts, 4 modalities


def tight_pool(model, prompt_ids, max_new: int, block_size: int = 16) -> float:
    """kv_cache_gb for a pool that holds the longest prompt and one row, plus one block: rows get
    preempted and recomputed (through the vision tower's prompt again when its blocks went)."""
    from medix_fast.generate.memory import kv_bytes_per_token

    longest = max(len(p) for p in prompt_ids)
    blocks = -(-longest // block_size) + -(-max_new // block_size) + 2
    return blocks * block_size * kv_bytes_per_token(model.config.get_text_config(), model.dtype) / 2**30


def pixels(vision, prompts):
    return [vision.encode([load_image(p.image)]) for p in prompts]


def test_tiny_vl_loads_with_pil_image_processor(vl):
    model, tokenizer, vision = vl
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(vision.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], tokenize=False)
    weight, _ = lm_head(model)
    assert weight.shape == (len(tokenizer), model.config.text_config.hidden_size)


def test_sample_images_are_rebuilt_byte_identically(tmp_path):
    path = sample_images.write_vl_sample(tmp_path)
    assert path.read_bytes() == (DATA_DIR / "train_vl.jsonl").read_bytes()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["solution"].split(">")[0] for r in rows}) == 16
    for row in rows:
        assert (tmp_path / row["image"]).read_bytes() == (DATA_DIR / row["image"]).read_bytes()


def test_image_tokens_follow_the_pixel_limits(vl, prompts):
    model, tokenizer, vision = vl
    image = load_image(prompts[0].image)  # 64x64
    assert prompts[0].ids.count(model.config.image_token_id) == vision.encode([image]).tokens[0] == 4  # 56x56: 2x2
    big = Vision(vision.image_processor, vision.image_token_id, min_pixels=112 * 112, max_pixels=112 * 112)
    assert big.encode([image]).tokens == [16]
    ids = build_prompts([Example("q?", "<X_RAY> a", prompts[0].image)], tokenizer, 4096, big)[0][0].ids
    assert ids.count(model.config.image_token_id) == 16
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        Vision(vision.image_processor, vision.image_token_id, min_pixels=100, max_pixels=10)


def test_image_as_path_bytes_pil_or_datasets_dict(prompts):
    path = prompts[0].image
    expected = load_image(path)
    for value in (str(path), path.read_bytes(), Image.open(path), {"bytes": path.read_bytes(), "path": None}):
        assert np.array_equal(np.asarray(load_image(value)), np.asarray(expected))


def test_bad_images_are_reported_with_file_and_row(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    rows = [{"problem": "q", "solution": "<CT_SCAN> a", "image": "ok.png"},
            {"problem": "q", "solution": "<CT_SCAN> a", "image": "missing.png"},
            {"problem": "q", "solution": "<CT_SCAN> a", "image": "junk.png"},
            {"problem": "q", "solution": "<CT_SCAN> a", "image": 7}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_examples([str(data)], DataConfig())
    message = str(err.value)
    assert f"{data}:2: image file" in message and "missing.png' does not exist" in message
    assert f"{data}:3: image '{tmp_path / 'junk.png'}' is unreadable" in message
    assert f"{data}:4: field 'image' must be a path, bytes or a PIL image, got int" in message
    kept = load_examples([str(data)], DataConfig(strict=False))
    assert [e.source for e in kept] == [f"{data}:1"] and kept[0].image == tmp_path / "ok.png"
    with pytest.raises(DataError, match="rows.jsonl:9: image of 3 bytes is unreadable"):
        load_image(b"abc", source="rows.jsonl:9")
    buf = io.BytesIO()
    Image.new("L", (5, 3)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).mode == "RGB"


def test_expand_image_tokens_counts_must_match():
    assert expand_image_tokens([1, 9, 2], 9, [3]) == [1, 9, 9, 9, 2]
    with pytest.raises(ValueError, match="1 image token"):
        expand_image_tokens([1, 9, 2], 9, [3, 2])
    with pytest.raises(ValueError, match="more image tokens"):
        expand_image_tokens([9, 9], 9, [1])


def test_mrope_positions_of_a_padded_batch_equal_the_unpadded_samples(vl, prompts):
    model, _, vision = vl
    pix = pixels(vision, prompts[:2])
    a, b = prompts[0].ids, prompts[1].ids[:-5]
    width = max(len(a), len(b))
    for left in (True, False):
        rows = [[0] * (width - len(x)) + x if left else x + [0] * (width - len(x)) for x in (a, b)]
        mask = torch.tensor([[1 if (j >= width - len(x) if left else j < len(x)) else 0 for j in range(width)]
                             for x in (a, b)])  # (2, T)
        grid = torch.cat([p.image_grid_thw for p in pix])
        batch = mrope_positions(model, torch.tensor(rows), mask, grid)  # (3, 2, T)
        for i, (x, p) in enumerate(zip((a, b), pix)):
            alone = mrope_positions(model, torch.tensor([x]), None, p.image_grid_thw)[:, 0]  # (3, len)
            assert torch.equal(batch[:, i][:, mask[i].bool()], alone)
    alone = mrope_positions(model, torch.tensor([a]), None, pix[0].image_grid_thw)[:, 0]
    image = torch.tensor(a) == model.config.image_token_id
    s = int(alone[0, image][0])  # the image's start position: t stays, (h, w) walk the 2x2 merged grid
    assert alone[:, image].tolist() == [[s] * 4, [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]]
    assert int(alone.max()) + 1 == len(a) - 2  # 4 image tokens span 2 positions: HF's rope delta is -2


def test_sampler_greedy_matches_generate_with_images(vl, prompts):
    model, tokenizer, vision = vl
    pix = pixels(vision, prompts)
    text_only = build_prompts([Example("Is this a CT scan?", "<CT_SCAN> yes")], tokenizer, 4096, vision)[0][0]
    ids, pix = [p.ids for p in prompts] + [text_only.ids], pix + [None]
    sampler = Sampler(model, max_num_seqs=6, kv_cache_gb=tight_pool(model, ids, 24))
    out = sampler.generate(ids, n=2, max_new_tokens=24, temperature=0.0, images=pix, stop_token_ids=[])
    assert sampler.stats.preemptions > 0  # 10 rows through 6 slots and a pool too small for all
    differs_without_mrope = False
    for i, (x, p) in enumerate(zip(ids, pix)):
        x = torch.tensor([x])
        kw = hf_image_kwargs(model, x, p.pixel_values, p.image_grid_thw) if p is not None else {}
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, **kw)[0, x.shape[1]:].tolist()
        assert out.completion_ids[2 * i] == out.completion_ids[2 * i + 1] == ref, i
        if p is not None:  # same image at 1-D positions: a sampler making that mistake would fail the check above
            with torch.no_grad():
                right = model(input_ids=x, **kw).logits[0, -1]
                plain = model(input_ids=x, position_ids=torch.arange(x.shape[1])[None], **kw).logits[0, -1]
            differs_without_mrope |= bool((right - plain).abs().max() > 1e-3 * right.abs().max())
    assert differs_without_mrope  # (logits: from transformers 5.25 the tiny model's greedy tokens alone do not differ)


def test_sampler_rejects_mismatched_images(vl, prompts):
    model, _, vision = vl
    sampler = Sampler(model, max_num_seqs=4)
    pix = pixels(vision, prompts[:1])
    with pytest.raises(ValueError, match="prompt 0: 4 image tokens in the prompt but its images give 0"):
        sampler.generate([prompts[0].ids], max_new_tokens=2, images=[None])
    with pytest.raises(ValueError, match="images has 1 entries for 2 prompts"):
        sampler.generate([prompts[0].ids, prompts[1].ids], max_new_tokens=2, images=pix)


def test_training_step_through_the_vision_tower(vl, prompts):
    model, _, vision = vl
    model.train()
    pix = pixels(vision, prompts[:2])
    width = max(len(p.ids) for p in prompts[:2])
    ids = torch.tensor([p.ids + [0] * (width - len(p.ids)) for p in prompts[:2]])  # (2, T) right-padded
    mask = torch.tensor([[1] * len(p.ids) + [0] * (width - len(p.ids)) for p in prompts[:2]])  # (2, T)
    h = hidden_states(model, ids, mask, pixel_values=torch.cat([p.pixel_values for p in pix]),
                      image_grid_thw=torch.cat([p.image_grid_thw for p in pix]))  # (2, T, H)
    weight, _ = lm_head(model)
    logp = torch.log_softmax(h[:, :-1] @ weight.T, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (2, T - 1)
    loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.backward()
    visual = model.model.visual
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in visual.merger.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(before[n], p) for n, p in visual.named_parameters(prefix="model.visual"))
    model.zero_grad(set_to_none=True)
    model.eval()


def test_qwen3_vl_loads_and_samples_like_generate(vl, prompts, tmp_path):
    """A random tiny Qwen3-VL (interleaved mrope, deepstack visual features), saved and loaded
    through load_model: the sampler's greedy output equals generate's."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    _, tokenizer, vision = vl
    token = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                              "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None, bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=token["<|image_pad|>"], video_token_id=token["<|video_pad|>"],
        vision_start_token_id=token["<|vision_start|>"], vision_end_token_id=token["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    vision.image_processor.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(load_image_processor(tmp_path)).__name__ == "Qwen2VLImageProcessorPil"
    pix = pixels(vision, prompts)
    sampler = Sampler(model, max_num_seqs=5, kv_cache_gb=tight_pool(model, [p.ids for p in prompts], 20))
    out = sampler.generate([p.ids for p in prompts], n=2, max_new_tokens=20, temperature=0.0, images=pix,
                           stop_token_ids=[])
    assert sampler.stats.preemptions > 0
    for i, (p, b) in enumerate(zip(prompts, pix)):
        x = torch.tensor([p.ids])
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, **hf_image_kwargs(model, x, b.pixel_values, b.image_grid_thw)
                             )[0, x.shape[1]:].tolist()
        assert out.completion_ids[2 * i] == out.completion_ids[2 * i + 1] == ref, i


def test_vision_tower_can_be_frozen(vl):
    from medix_fast.model.loading import set_vision_trainable

    model, _, _ = vl
    try:
        set_vision_trainable(model, False)
        assert not any(p.requires_grad for p in model.model.visual.parameters())
        assert all(p.requires_grad for p in model.model.language_model.parameters())
    finally:
        set_vision_trainable(model, True)
    assert all(p.requires_grad for p in model.model.visual.parameters())


def test_shared_prompt_with_images_equals_the_full_sequences(vl, prompts):
    """A group's image prompt run once (K/V repeated over G) then its completions: the same hidden
    states as every full prompt + completion through hidden_states, which is what training needs."""
    from transformers import DynamicCache

    from medix_fast.model.forward import continuation_hidden_states, prompt_hidden_states

    model, _, vision = vl
    pix = pixels(vision, prompts[:2])
    g, comps = 2, [[30, 31, 32], [33, 34], [35], [36, 37, 38]]  # 2 groups x G=2, right-padded to 3
    plen = max(len(p.ids) for p in prompts[:2])
    pids = torch.tensor([[0] * (plen - len(p.ids)) + p.ids for p in prompts[:2]])  # (2, P) left-padded
    pmask = torch.tensor([[int(j >= plen - len(p.ids)) for j in range(plen)] for p in prompts[:2]])  # (2, P)
    targets = torch.tensor([c + [0] * (3 - len(c)) for c in comps])  # (4, 3)
    cmask = torch.tensor([[1] * len(c) + [0] * (3 - len(c)) for c in comps])  # (4, 3)
    vision_in = dict(pixel_values=torch.cat([p.pixel_values for p in pix]),
                     image_grid_thw=torch.cat([p.image_grid_thw for p in pix]))
    with torch.no_grad():
        cache = DynamicCache()
        hp, start = prompt_hidden_states(model, pids, pmask, cache, **vision_in)  # (2, P, H), (2,)
        cache.batch_repeat_interleave(g)
        full_mask = torch.cat([pmask.repeat_interleave(g, 0), cmask], 1)  # (4, P + 3)
        hc = continuation_hidden_states(model, targets, full_mask, start.repeat_interleave(g), cache)  # (4, 3, H)
        for b, c in enumerate(comps):
            p = prompts[b // g]
            x = torch.tensor([p.ids + c])
            ref = hidden_states(model, x, torch.ones_like(x), pixel_values=pix[b // g].pixel_values,
                                image_grid_thw=pix[b // g].image_grid_thw)[0]  # (len, H)
            torch.testing.assert_close(hp[b // g, -1], ref[len(p.ids) - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hc[b, :len(c)], ref[len(p.ids):], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs multimodal positions \(3, B, T\)"):
        hidden_states(model, pids, pmask, position_ids=torch.zeros_like(pids), **vision_in)


def test_policy_logprobs_with_images_shared_prompt_equals_full_rows(vl, prompts):
    """PolicyObjective on a collated image micro-batch: the shared-prompt path (image encoded
    once per group) and the full-row path (each row with its group's image) agree."""
    from medix_fast.rl.update import PolicyObjective
    from medix_fast.rl.batch import Sequences, collate

    model, _, vision = vl
    pix = pixels(vision, prompts[:2])
    g = 2
    comps = [[30, 31, 32], [33, 34], [35], [36, 37, 38]]
    seqs = Sequences([prompts[k].ids for k in (0, 0, 1, 1)], comps, [torch.zeros(len(c)) for c in comps],
                     torch.tensor([1.0, -1.0, 0.5, -0.5]), g, [pix[k] for k in (0, 0, 1, 1)])
    mb = collate(seqs, [0, 1], 0, torch.device("cpu"))
    assert mb.image_grid_thw.shape == (2, 3)
    with torch.no_grad():
        shared = PolicyObjective(model, 1.0, share_prompt=True)(mb)  # (B, C)
        full = PolicyObjective(model, 1.0, share_prompt=False)(mb)  # (B, C)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    assert (shared[mb.mask.bool()] < 0).all()
    with torch.no_grad():  # packed with another group, each group's image stays with its rows
        alone = [PolicyObjective(model, 1.0)(collate(seqs, [k], 0, torch.device("cpu"))) for k in (0, 1)]
    for k, part in enumerate(alone):
        width = part.shape[1]
        torch.testing.assert_close(shared[k * g:(k + 1) * g, :width], part, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_vision", [True, False])
def test_one_training_step_on_images_end_to_end(tmp_path, train_vision):
    from safetensors.torch import load_file

    from medix_fast.checkpoint import latest_checkpoint
    from medix_fast.metrics import read_metrics
    from medix_fast.demo.cache import ensure_tiny_model
    from medix_fast.train import main

    out = tmp_path / "run"
    assert main(["model.path=tiny-vl", "data.train_files=[sample:train_vl]", "data.val_files=[]",
                 "data.min_pixels=784", "data.max_pixels=12544", f"model.train_vision={str(train_vision).lower()}",
                 "train.steps=1", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "sampling.group_size=4",
                 "sampling.max_new_tokens=40", "algorithm.chunk_prompts=4", "algorithm.max_tries=4",
                 "eval.every=0", "checkpoint.every=1", "logging.progress=false", "optim.lr=1e-2",
                 "train.seed=3", f"train.output_dir={out}"]) == 0
    # a seed whose 8 samples score differently (groups of equal rewards are kept by DAPO's mean filter
    # but carry no advantage: the tiny model is right too rarely for every seed to give a spread)
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["optimizer_steps"] == 1 and record["advantage/abs_mean"] > 0 and record["grad_norm"] > 0
    before = load_file(ensure_tiny_model(vl=True) / "model.safetensors")
    after = load_file(latest_checkpoint(out) / "model" / "model.safetensors")
    visual = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert visual and any(k in after for k in visual)
    changed = any(not torch.equal(before[k], after[k]) for k in visual if k in after)
    assert changed == train_vision


def test_pixel_limits_in_the_config_are_checked():
    from medix_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.min_pixels / data.max_pixels"):
        load_config(None, ["data.min_pixels=5000", "data.max_pixels=100"])
    with pytest.raises(ConfigError, match="data.min_pixels / data.max_pixels"):
        load_config(None, ["data.min_pixels=-1"])
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "medix_r1_7b_gspo.yaml")
    assert (cfg.data.min_pixels, cfg.data.max_pixels, cfg.model.train_vision) == (262_144, 4_194_304, True)


def test_chat_template_from_the_processor_file(vl, tmp_path):
    """Qwen VL checkpoints may ship the chat template only in the processor's chat_template.json."""
    from medix_fast.model.loading import load_tokenizer

    _, tokenizer, _ = vl
    template = tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_tokenizer(tmp_path).chat_template == template
