"""``sampling.exact``: the one switch that makes a model's sampler and trainer log-probs agree bit
for bit (docs/mismatch.md#exact-mode), set once on the model by :func:`enable`.

    enable(model)      # every Linear batch-invariant, the text model's attention "medix_exact"
    is_exact(model)    # what the sampler (attention back-end, log-probs) and the trainer (LM head) ask

What it changes, all through ``medix_fast.kernels.exact``: every ``nn.Linear`` of the model (the
vision tower's too) and the vision patch embedding (a convolution whose stride is its kernel: a
GEMM over patches) run in fixed-shape tiles; the text model's attention outside the sampler
(the trainer's forwards) is ``medix_exact``: K/V rounded to the compute dtype as the sampler's pool
holds them, each query over its keys in position order; the sampler takes the same maths over its
pool (``generate/attention.py``, back-end "exact"), the same LM head (``model/forward.py``'s
``head_logits``) and the same log-softmax (``generate/tokens.py``). What stays: a mixture-of-experts
layer's expert GEMMs (grouped, not ``nn.Linear``), so a MoE model keeps a residual.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..kernels import exact

ATTN_IMPLEMENTATION = "medix_exact"
_FLAG = "_medix_exact"


def is_exact(model: nn.Module) -> bool:
    """Whether :func:`enable` was called on ``model``."""
    return getattr(model, _FLAG, False)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return exact.linear(x, self.weight, self.bias)


def _patch_forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A patch embedding (stride = kernel, one patch per input) as the GEMM it is."""
    if tuple(x.shape[2:]) != tuple(self.kernel_size):
        raise ValueError(f"exact mode: {tuple(x.shape)} is not one patch per input of kernel {self.kernel_size}")
    out = exact.linear(x.flatten(1), self.weight.flatten(1), self.bias)  # (patches, C_out)
    return out.view(*out.shape, *([1] * (x.dim() - 2)))


def enable(model: nn.Module) -> None:
    """Put ``model`` in exact mode (see the module docstring); for good (no undo)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = types.MethodType(_linear_forward, module)
        elif isinstance(module, nn.Conv3d) and module.kernel_size == module.stride and not any(module.padding):
            module.forward = types.MethodType(_patch_forward, module)
    text_config = model.config.get_text_config()
    vl = text_config is not model.config
    model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION} if vl else ATTN_IMPLEMENTATION)
    setattr(model, _FLAG, True)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The trainer's attention in exact mode: query (B, H, Tq, D), key / value (B, kv, Tk, D),
    ``attention_mask`` (B, 1, Tq, Tk) bool (True: attend; causal and padding) -> ((B, Tq, H, D), None).
    Each row's keys are put in position order (its attended columns first, in column order), and
    query t sees the first ``mask[t].sum()`` of them: exactly its causal keys."""
    dtype = _compute_dtype(key)
    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    q = query.transpose(1, 2).to(dtype)  # (B, Tq, H, D)
    k, v = key.transpose(1, 2).to(dtype), value.transpose(1, 2).to(dtype)  # (B, Tk, kv, D)
    mask = attention_mask[:, 0].expand(b, tq, tk)  # (B, Tq, Tk)
    order = torch.argsort((~mask.any(1)).to(torch.int8), dim=-1, stable=True)  # (B, Tk): attended keys first
    index = order[:, :, None, None].expand_as(k)
    k, v = k.gather(1, index), v.gather(1, index)
    seen = mask.sum(-1)  # (B, Tq)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return exact.attention(q, k, v, seen, scale).to(query.dtype), None


def _mask(*args, **kwargs):
    """transformers' boolean 4-D mask, never skipped (the exact attention always reads it)."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _mask)
