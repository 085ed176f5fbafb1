"""The policy forward pieces the trainer and the sampler share: final hidden states from the decoder
alone (the LM head is applied by the fused kernels, never as full logits), the LM head's weights,
a prompt's forward that fills a K/V cache and the continuation that reads it, and the multimodal
rotary positions of the VL models.

    h = hidden_states(model, input_ids, attention_mask)   # (B, T, H): final normed hidden states
    weight, bias = lm_head(model)                         # (V, H), None
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..kernels import exact
from ..kernels.logprobs import cast, chunk_logits, compute_dtype, no_autocast
from .compat import cache_kwargs, image_token_types
from .exact import is_exact
from .loading import is_vl


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1-D positions of left-padded rows: each row's first real token at 0 (padding at 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)


def mrope_positions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """A VL model's multimodal rotary positions (3, B, T) (temporal, height, width): text tokens
    count on all three axes, an image's tokens take its (t, h, w) grid positions from the text
    position before it, and the text after it resumes at that position + the grid's larger side.
    Padding (``attention_mask`` 0, left or right) gets 0."""
    types = image_token_types(model, input_ids)  # (B, T): 1 on image tokens
    positions, _ = model.model.get_rope_index(input_ids, types, image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)
    return positions  # (3, B, T)


def hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) from the decoder alone: the LM head is not applied.

    For a VL model, ``pixel_values`` / ``image_grid_thw`` (from :mod:`medix_fast.data.vision`) go
    through the vision tower and replace the ``<|image_pad|>`` embeddings; ``position_ids``
    None means :func:`mrope_positions` (never the model's cached rope deltas of a past generate).
    """
    if is_vl(model):
        if position_ids is None:
            position_ids = mrope_positions(model, input_ids, attention_mask, image_grid_thw)  # (3, B, T)
        elif pixel_values is not None and position_ids.dim() == 2:
            raise ValueError("a VL model with images needs multimodal positions (3, B, T) "
                             "(models.mrope_positions), got 2-D position_ids")
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
    else:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
    return out.last_hidden_state  # (B, T, H)


def lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection: weight (V, H) and bias (V,) or None. Tied to the embeddings when the config says so."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits (..., V) of final hidden states (..., H) in the trainer's cast order: operands in
    the LM head's compute dtype (autocast's when on), products kept in fp32, never rounded to bf16
    (``chunk_logits``, what ``fused_linear_logprobs`` computes). The one exception: a CUDA weight
    not in the compute dtype (DDP's fp32 masters under autocast) goes through autocast's cached
    cast and bf16 logits, as a copy of the weight per call would cost more than the head. A model
    in exact mode (``model/exact.py``) takes ``kernels.exact.head_logits``'s fixed-shape GEMMs."""
    weight, bias = lm_head(model)
    dtype = compute_dtype(hidden)
    if is_exact(model):
        with no_autocast(hidden):
            h, w, b = cast((hidden.reshape(-1, hidden.shape[-1]), weight, bias), dtype)  # (n, H), (V, H), (V,)
            return exact.head_logits(h, w, b).view(*hidden.shape[:-1], -1)  # (..., V)
    if weight.is_cuda and weight.dtype != dtype:
        return torch.nn.functional.linear(hidden, weight, bias).float()
    with no_autocast(hidden):
        h, w, b = cast((hidden.reshape(-1, hidden.shape[-1]), weight, bias), dtype)  # (n, H), (V, H), (V,)
        return chunk_logits(h, w, b, 1.0).view(*hidden.shape[:-1], -1)  # (..., V)


def prompt_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache=None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P) through the model once, filling ``cache`` (a transformers
    ``Cache``, or None for no cache): their hidden
    states (B, P, H) and the position each one's continuation starts at (B,). Text: the token count;
    VL: the largest mrope position + 1 (the images go through the vision tower here)."""
    if is_vl(model):
        positions = mrope_positions(model, input_ids, attention_mask, image_grid_thw)  # (3, B, P)
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          **cache_kwargs(model.model, cache), use_cache=cache is not None)
        return out.last_hidden_state, positions.amax((0, 2)) + 1  # (B, P, H), (B,)
    positions = left_pad_positions(attention_mask)  # (B, P)
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                  **cache_kwargs(decoder, cache), use_cache=cache is not None)
    return out.last_hidden_state, attention_mask.sum(1)  # (B, P, H), (B,)


def continuation_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: torch.Tensor,
    cache,
) -> torch.Tensor:
    """Hidden states (B, C, H) of tokens that continue the prompts in ``cache`` (from
    :func:`prompt_hidden_states`, its start positions ``start`` (B,) repeated to B rows if the
    cache was). ``attention_mask`` (B, P + C) covers prompt and continuation. Positions are
    ``start + 0, 1, ...``, the same on the three mrope axes of a VL model (text after the image)."""
    positions = start[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)  # (B, C)
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                  **cache_kwargs(decoder, cache), use_cache=True)
    return out.last_hidden_state  # (B, C, H)
