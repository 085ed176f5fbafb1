"""The embedded tiny mixture-of-experts models: a random Qwen3-VL-MoE (Qwen3-VL-30B-A3B's
architecture) and a random text-only Qwen3-MoE, for tests and benchmarks.

    python -c 'from medix_fast.demo.cache import ensure_tiny_model; print(ensure_tiny_model(vl=True, moe=True))'

Built offline in a second from the embedded tiny checkpoints (``ensure_tiny_model()`` /
``ensure_tiny_model(vl=True)``, built first if missing): their tokenizer and chat template (and
the VL one's PIL image processor, patch 14, 2x2 merge), and a randomly initialised decoder of
``TinyMoeConfig``: hidden 64, 2 layers, 4 query / 2 K/V heads of 16, every layer a sparse MoE
block of 4 experts (intermediate 48) with 2 active per token, top-k weights renormalised (as
Qwen3-30B-A3B), tied embeddings. The VL one adds Qwen3-VL's vision tower (2 blocks of width 32,
deepstack features from block 0) and interleaved mrope. Weights are drawn with std 0.2 (not the
usual 0.02), so the logits and the router's choices are far from ties and greedy decoding is
stable across implementations. ``dense_config`` is the dense model of the same active size
(intermediate = active experts x expert intermediate), for the benchmarks.

``model.path: tiny-moe`` / ``tiny-vl-moe`` in a config means these (``demo.cache``).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
from transformers import (PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration)
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from ..model.moe import save_pretrained
from .tiny_vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START


@dataclass(frozen=True)
class TinyMoeConfig:
    hidden_size: int = 64  # multiples of 8: the CPU grouped GEMM wants 16-byte strides (fp32 and bf16)
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_experts: int = 4
    experts_per_token: int = 2
    expert_intermediate: int = 48  # != hidden / 2: a transposed expert weight cannot pass for the right one
    max_position_embeddings: int = 1024
    init_std: float = 0.2


def text_fields(cfg: TinyMoeConfig, vocab_size: int) -> dict:
    """The decoder fields shared by the text-only and VL configs."""
    return dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.experts_per_token * cfg.expert_intermediate,
                moe_intermediate_size=cfg.expert_intermediate, num_experts=cfg.num_experts,
                num_experts_per_tok=cfg.experts_per_token, decoder_sparse_step=1,
                max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_std,
                tie_word_embeddings=True, bos_token_id=None)


def dense_config(cfg: TinyMoeConfig, vocab_size: int) -> dict:
    """Fields of the dense Qwen3 of the same active size: its MLP is as wide as the active experts."""
    moe = text_fields(cfg, vocab_size)
    for key in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "decoder_sparse_step"):
        moe.pop(key)
    return moe


def build_tiny_moe(out: str | pathlib.Path, base: str | pathlib.Path, seed: int = 0, vl: bool = False,
                   cfg: TinyMoeConfig = TinyMoeConfig()) -> pathlib.Path:
    """Save a random tiny Qwen3-MoE (``vl``: Qwen3-VL-MoE) with the tokenizer (and image processor)
    of the tiny checkpoint ``base`` to ``out``; returns the path."""
    out = pathlib.Path(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    text = dict(text_fields(cfg, len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id])
    if vl:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        config = Qwen3VLMoeConfig(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
                               initializer_range=cfg.init_std),
            image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
            vision_end_token_id=ids[VISION_END], tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = Qwen3VLMoeForConditionalGeneration(config).eval()
        Qwen2VLImageProcessorPil.from_pretrained(base).save_pretrained(out)
    else:
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**text, norm_topk_prob=True)).eval()
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_pretrained(model, out)  # the experts in the Hub layout, as a downloaded checkpoint
    tokenizer.save_pretrained(out)
    return out
