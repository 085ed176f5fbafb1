"""Image-prompt rollout throughput next to text-only, same VL model: medix_fast's ``Sampler``.

    python -m bench --only vl

A randomly initialised Qwen2.5-VL (no download) samples G completions for each of P prompts
with stopping disabled, so every row makes exactly ``new`` tokens. Rows of one group:
- ``medix_fast`` (the subject): each prompt carries one random image (its ``<|image_pad|>`` run
  expanded, pixels patchified beforehand: the timed call is the sampler, vision tower included);
- ``text-only``: the same prompts without the image (no vision tower, shorter prefill).
The ratio time/text-only is the cost of the images in a rollout.
  CPU: text hidden 192 x 6 layers, vision 4 blocks of 128, 112x112 images (16 image tokens),
       4 prompts x G=4 x 64 new tokens, fp32.
  GPU: Qwen2.5-VL-3B-like text (hidden 2048, 36 layers), vision 32 blocks of 1280 (the real
       tower's width), 448x448 images (256 image tokens), 8 prompts x G=8 x 128 new, bf16.
Throughput is generated tokens per second.
"""
from __future__ import annotations

import torch

from .case import SUBJECT, Case

IMAGE, VISION_START, VISION_END = 5, 6, 7  # token ids; prompts draw text tokens from 8 up
SHAPES = {  # text fields, vision fields, image side, (prompts, G, new tokens, text tokens)
    "smoke": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=256),
              dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2), 56, (2, 2, 4, 12)),
    "cpu": (dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
            dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=2), 112, (4, 4, 64, 64)),
    "gpu": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151_936),
            dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16), 448, (8, 8, 128, 128)),
}


def _model(text: dict, vision: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = text["hidden_size"] // text["num_attention_heads"] // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # (t, h, w) rotary pairs
    config = Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(**vision, out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision["depth"] - 1]),
        image_token_id=IMAGE, video_token_id=IMAGE + 100, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(device, dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def _inputs(side: int, layout: tuple, vocab: int, device, dtype):
    """Image prompts, their PixelBatches and the same prompts without the image."""
    from medix_fast.data.vision import PixelBatch

    prompts_n, _, _, text_len = layout
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, side // 14, side // 14]])  # (1, 3)
    tokens = side // 14 * (side // 14) // 4
    texts = [torch.randint(8, vocab, (text_len + 4 * i,), generator=gen).tolist() for i in range(prompts_n)]
    with_image = [[VISION_START] + [IMAGE] * tokens + [VISION_END] + t for t in texts]
    pixels = [PixelBatch(torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen).to(device, dtype), grid, [tokens])
              for _ in texts]
    return with_image, pixels, texts


def cases(smoke: bool, device: torch.device) -> list[Case]:
    from medix_fast.generate import Sampler

    gpu = device.type == "cuda"
    text, vision, side, layout = SHAPES["smoke" if smoke else ("gpu" if gpu else "cpu")]
    prompts_n, g, new, _ = layout
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = (f"Qwen2.5-VL h{text['hidden_size']}x{text['num_hidden_layers']} vision {vision['depth']}x"
             f"{vision['hidden_size']} {'bf16' if gpu else 'fp32'}, {side}x{side} images, "
             f"{prompts_n} prompts x G={g} x {new} new")

    def build(dev, images: bool):
        model = _model(text, vision, dev, dtype)
        with_image, pixels, texts = _inputs(side, layout, text["vocab_size"], dev, dtype)
        prompts = with_image if images else texts
        sampler = Sampler(model, max_num_seqs=prompts_n * g)
        return lambda: sampler.generate(prompts, n=g, max_new_tokens=new, temperature=1.0, stop_token_ids=[],
                                        seed=0, images=pixels if images else None)

    rows = prompts_n * g
    return [Case("vl_rollout", f"batch {rows}", impl, shape, rows * new,
                 lambda dev, images=images: build(dev, images), work=rows * new, work_unit="tok/s")
            for impl, images in ((SUBJECT, True), ("text-only", False))]
