"""The decode step of each shipped training config as shapes: what the static decoder launches.

    for shape in shipped():                        # one per model of configs/medix_r1_*.yaml
        for bucket in shape.buckets:               # the CUDA-graph batch sizes
            prompt, own = shape.launches(bucket, shape.prompt_len, shape.new_len, sms=132)

Passed to the kernels' compile check (``medix_fast.kernels.compile_check``: every launch compiled
for sm_80 / sm_90; the kernels know no model) and used by the decode traffic plan
(``decode_traffic.py``). A decode step of the static decoder (``cuda_graphs.py``) runs, per
layer, the prompt part (an item per resident prompt, its ``group_size`` rows as extra query rows)
and the own part (an item per row) of ``kernels.triton_decode.paged_decode`` over tables as wide
as the call's longest prompt and completion.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import default_block_size
from .cuda_graphs import batch_buckets
from ..kernels.triton_decode import DecodeLaunch, decode_launch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class DecodeShape:
    """One model's decode step as a shipped config runs it (Triton back-end, bf16 compute)."""
    name: str  # the config file's stem
    model: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    dim: int  # head dim
    vocab: int
    weight_bytes: int  # what one decode step reads of the weights, bf16 (decode_weights)
    group: int  # sampling.group_size
    max_rows: int  # sampling.max_num_seqs
    block_size: int
    prompt_len: int  # data.max_prompt_length
    new_len: int  # sampling.max_new_tokens
    dtype: torch.dtype = torch.bfloat16

    @property
    def buckets(self) -> list[int]:
        return batch_buckets(self.max_rows)

    def launches(self, bucket: int, prompt_len: int, new_len: int, sms: int,
                 dtype: torch.dtype | None = None) -> tuple[tuple[int, DecodeLaunch], tuple[int, DecodeLaunch]]:
        """(items, launch) of the prompt part and of the own part of the static step at batch
        ``bucket`` with tables as wide as ``prompt_len`` and ``new_len`` tokens."""
        dtype = dtype or self.dtype
        bs = self.block_size
        prompt_tokens = -(-max(1, prompt_len - 1) // bs) * bs
        own_tokens = -(-new_len // bs) * bs
        # the static step's group grid has ``bucket`` slots (any row may be its group's last one
        # left); the empty ones write and read no partials
        prompt = decode_launch(bucket, self.group, self.heads, self.kv_heads, self.dim, bs, prompt_tokens, dtype, sms)
        own = decode_launch(bucket, 1, self.heads, self.kv_heads, self.dim, bs, own_tokens, dtype, sms)
        return (bucket, prompt), (bucket, own)


def config_paths() -> list[Path]:
    root = Path(str(importlib.resources.files("medix_fast.configs")))
    return sorted(root.glob("medix_r1_*.yaml"))


def shipped() -> list[DecodeShape]:
    """One ``DecodeShape`` per distinct model of the shipped MediX-R1 configs (the 8B DAPO and GRPO
    configs share one)."""
    from ..config import load_config
    from .memory import load_config as model_config

    shapes, seen = [], set()
    for path in config_paths():
        cfg = load_config(path)
        model = Path(cfg.model.path).name
        if model in seen:
            continue
        seen.add(model)
        mc = model_config(cfg.model.path)
        text = mc.get_text_config()
        heads = text.num_attention_heads
        dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        shapes.append(DecodeShape(
            path.stem, model, text.num_hidden_layers, text.hidden_size, heads, text.num_key_value_heads, dim,
            text.vocab_size, 2 * decode_weights(mc),
            cfg.sampling.group_size, cfg.sampling.max_num_seqs, cfg.sampling.block_size or default_block_size("triton"),
            cfg.data.max_prompt_length, cfg.sampling.max_new_tokens))
    return shapes


def decode_weights(model_config) -> int:
    """Parameters a decode step reads: the language model's, the LM head included, the vision tower
    and the embedding table excluded (a step looks up b rows of it). A mixture of experts reads all
    its experts: at 64 rows x 8 of 128 experts each, 98 % of them are routed to in every layer."""
    from ..model.footprint import parameter_counts

    return parameter_counts(model_config).decode
