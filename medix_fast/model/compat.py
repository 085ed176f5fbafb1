"""Where the supported transformers releases differ, answered once (``setup.py`` declares the range).

    out = decoder(input_ids=ids, **cache_kwargs(decoder, cache), use_cache=True)
    ref = model.generate(input_ids=ids, **hf_image_kwargs(model, ids, pixel_values, image_grid_thw))

- The K/V cache keyword of a model forward: ``cache`` from transformers 5.24 (``past_key_values``
  still works there but warns that it goes away in 5.40), ``past_key_values`` before. Chosen by the
  signature of the module called, so it stays right for any release in the range.
- The image inputs of transformers' own VL forward / ``generate``: from 5.3 they need
  ``mm_token_type_ids`` (1 on image tokens) or they silently fall back to 1-D text positions, so
  every Hugging Face reference run on an image prompt takes its inputs from here.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(module: nn.Module) -> str:
    """``"cache"`` when ``module``'s forward takes it (transformers >= 5.24), else ``"past_key_values"``
    (a ``torch.compile`` wrapper is looked through)."""
    return _cache_keyword(type(getattr(module, "_orig_mod", module)).forward)


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{cache_keyword(module): cache}``: splice into the call of ``module``."""
    return {cache_keyword(module): cache}


def image_token_types(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int: 1 on a VL model's ``<|image_pad|>`` tokens, 0 elsewhere (transformers' ``mm_token_type_ids``)."""
    return (input_ids == model.config.image_token_id).int()


def hf_image_kwargs(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                    image_grid_thw: torch.Tensor | None) -> dict:
    """The keyword arguments transformers' own forward / ``generate`` of a VL ``model`` needs for
    ``input_ids`` (B, T) with these images: pixels, grids and ``mm_token_type_ids``. Empty without images."""
    if pixel_values is None:
        return {}
    return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
            "mm_token_type_ids": image_token_types(model, input_ids)}
