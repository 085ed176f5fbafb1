"""The embedded tiny vision-language model: a random Qwen2.5-VL checkpoint with its processor, for tests.

    python -c 'from medix_fast.demo.cache import ensure_tiny_model; print(ensure_tiny_model(vl=True))'

Built offline in a few seconds from the embedded tiny text model (``ensure_tiny_model()``,
built first if missing): its byte-level BPE tokenizer plus Qwen's vision tokens
(``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ``<|video_pad|>``), a chat
template that renders an image part as ``<|vision_start|><|image_pad|><|vision_end|>``, a
``Qwen2_5_VLForConditionalGeneration`` whose language model (hidden 128, 4 layers, 4/2 heads,
mrope) carries the warm-started text weights (so it writes the MediX format and its output
depends on positions; the 4 new token embeddings are random) and whose vision tower (2 blocks
of width 64, patch 14, 2x2 merge) is random, and a
PIL/numpy Qwen2-VL image processor (no torchvision needed; ``medix_fast.data.vision`` expands
the image tokens itself, since transformers' ``Qwen2_5_VLProcessor`` wants a torchvision video processor).
Pixel limits are small (``TINY_MIN_PIXELS`` .. ``TINY_MAX_PIXELS``): a 64x64 image becomes
a 56x56 resize, 16 patches, 4 image tokens.

``ensure_tiny_model(vl=True)`` caches it beside the text model as ``tiny-vl-<digest>-seed<seed>``.
"""
from __future__ import annotations

import pathlib

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from . import tiny

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
TEXT_PART = "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
IMAGE_PART = "{%- if part['type'] == 'image' -%}{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' -}}{%- endif -%}"
CHAT_TEMPLATE = tiny.CHAT_TEMPLATE.replace(TEXT_PART, IMAGE_PART + TEXT_PART)
PATCH, MERGE = 14, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = (PATCH * MERGE) ** 2, (4 * PATCH * MERGE) ** 2  # 28x28 .. 112x112


def build_tiny_vl(out: str | pathlib.Path, text: str | pathlib.Path, seed: int = 0,
                  cfg: tiny.TinyConfig = tiny.TinyConfig()) -> pathlib.Path:
    """Save a random tiny Qwen2.5-VL model, its tokenizer and processor to ``out``, its language model
    carrying the weights of the tiny text checkpoint ``text``; returns the path."""
    out = pathlib.Path(out)
    tokenizer = tiny.PreTrainedTokenizerFast.from_pretrained(text)
    tokenizer.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
    head_dim = cfg.hidden_size // cfg.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
            bos_token_id=None,
        ),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=cfg.hidden_size,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=PATCH * MERGE * 2,
                           fullatt_block_indexes=[1]),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    text_model = tiny.Qwen2ForCausalLM.from_pretrained(text)
    with torch.no_grad():
        for name, param in text_model.model.state_dict().items():
            target = model.model.language_model.state_dict()[name]
            target[:param.shape[0]].copy_(param)  # embeddings: the first rows; the vision tokens keep their init
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
                                               patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
