"""The paged K/V pool, the per-step attention metadata, and the attention back-end that writes and
reads them inside a Hugging Face forward.

Pool: one tensor (K then V, every layer) in the compute dtype, zeroed when made (in sleepable
memory, ``vmm.py``, at each wake too); block ``b`` of layer ``l`` holds ``block_size`` consecutive
tokens of one sequence (a prompt's shared prefix, or one row's private tokens). ``layer(l)`` gives
K and V as ``(blocks, block_size, kv_heads, head_dim)`` views whatever the storage order:
head-major ``(kv_heads, blocks, block_size, head_dim)`` (a head's block is one contiguous run: what
the Triton kernel streams and what the PyTorch path gathers without a transpose) or token-major
(flash-attn's paged layout). Token slot
``s = block * block_size + offset`` indexes the flattened ``(blocks * block_size, kv_heads,
head_dim)`` view. Block 0 is never handed out (``blocks.BlockPool``): padded rows write there.

The back-end ``"medix_paged"`` is registered with transformers' ``AttentionInterface``; the engine
switches the (text) model to it for a call and passes a ``DecodeStep`` or ``PrefillStep`` as the
forward's ``medix_step`` keyword, which transformers hands to every attention call. Each layer's
new K/V (after RoPE and any q/k norm: whatever the model computed) is written to the step's
slots, then attention runs through ``attention.py``. Since no transformers cache object is
passed, the forward takes ``use_cache=False`` and no causal-mask tensor is built (transformers
skips masks for back-ends it does not know).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import attention

ATTN_IMPLEMENTATION = "medix_paged"


def kv_shape(text_config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return text_config.num_hidden_layers, kv_heads, head_dim


class KVPool:
    """The K/V of every layer in fixed-size blocks (see the module docstring)."""

    def __init__(self, text_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 head_major: bool = True, driver=None):
        layers, kv_heads, head_dim = kv_shape(text_config)
        self.num_blocks, self.block_size, self.dtype, self.device = num_blocks, block_size, dtype, device
        self.head_major = head_major
        shape = (2, layers, *((kv_heads, num_blocks, block_size) if head_major else (num_blocks, block_size, kv_heads)),
                 head_dim)
        self.memory = None  # vmm.SleepableMemory when ``driver`` (a vmm.Driver) is given
        if driver is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
            return
        from .vmm import SleepableMemory

        nbytes = dtype.itemsize * math.prod(shape)
        self.memory = SleepableMemory(driver, nbytes, device)
        self.kv = self.memory.tensor()[:nbytes].view(dtype).view(shape).zero_()

    def wake(self) -> None:
        """Pages behind a sleeping pool again, zeroed as when made: attention reads whole blocks
        (a block's tail past a row's length is masked, but 0 x NaN is NaN: undefined pages could hold NaNs)."""
        if self.memory is not None and self.memory.wake():
            self.kv.zero_()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, (blocks, block_size, kv_heads, head_dim) views each."""
        k, v = self.kv[0, index], self.kv[1, index]
        return (k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) if self.head_major else (k, v)

    def write(self, index: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store tokens' K and V (N, kv_heads, head_dim) at token ``slots`` (N,) of layer ``index``."""
        k, v = self.layer(index)
        k.view(-1, *k.shape[2:]).index_copy_(0, slots, key.to(self.dtype))
        v.view(-1, *v.shape[2:]).index_copy_(0, slots, value.to(self.dtype))


@dataclass
class DecodeStep:
    """One token per row (b rows) through the cascade: each row's query attends to its prompt's
    shared blocks (the group's rows stacked over one read) and to its own blocks."""
    pool: KVPool
    backend: str  # attention.BACKENDS
    slots: torch.Tensor  # (b,) int64: where each row's new token's K/V goes
    row_table: torch.Tensor  # (b, Wc) int32: each row's private blocks
    row_lens: torch.Tensor  # (b,) int32: private tokens incl. the new one
    group_table: torch.Tensor  # (P, Wp) int32: each group's prompt blocks
    group_lens: torch.Tensor  # (P,) int32: prompt tokens cached (the prompt's length - 1)
    group_rows: torch.Tensor  # (P, Gm) int64: the batch rows of each group; b (a dummy row) pads
    cache: dict = field(default_factory=dict)  # per-step values the layers share (attention.py's memo)

    def memo(self, key: str, make):
        """``make()`` once per step (the same for every layer), then the cached value."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        """query (b, H, 1, D), key/value (b, kv, 1, D) -> output (b, 1, H, D)."""
        self.pool.write(layer, self.slots, key[:, :, 0], value[:, :, 0])
        k_pool, v_pool = self.pool.layer(layer)
        out = attention.cascade_decode(query[:, :, 0], k_pool, v_pool, self, scale, self.backend)  # (b, H, D)
        return out[:, None]


@dataclass
class PrefillStep:
    """Packed sequences (one batch row of N tokens): prompts filling their shared blocks (causal
    self-attention) and preempted rows recomputing their private tokens (attending to their
    prompt's blocks, then causally to themselves)."""
    pool: KVPool
    backend: str
    slots: torch.Tensor  # (N,) int64
    items: list[tuple[int, int, torch.Tensor | None, int]]  # (start, end, prefix blocks (W,) or None, prefix length)

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        """query (1, H, N, D), key/value (1, kv, N, D) -> output (1, N, H, D)."""
        k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (N, kv, D)
        self.pool.write(layer, self.slots, k_new, v_new)
        k_pool, v_pool = self.pool.layer(layer)
        out = attention.packed_prefill(query[0].transpose(0, 1), k_new, v_new, k_pool, v_pool, self.items, scale,
                                       self.backend)  # (N, H, D)
        return out[None]


def paged_attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              medix_step: DecodeStep | PrefillStep | None = None, **kwargs):
    """Attention back-end "medix_paged": the engine's step, or SDPA outside an engine call."""
    if medix_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return medix_step.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_interface)
