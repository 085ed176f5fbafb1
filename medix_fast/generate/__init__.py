"""The in-process sampler engine: G completions per prompt from the live training weights.

    from medix_fast.generate import Sampler
    out = Sampler(model, max_batch_size=64, max_seq_len=2048).generate(prompt_ids, n=8, max_new_tokens=512)

``sampler.py`` runs the batches, ``kv_cache.py`` holds the prefix-shared K/V and its decode
attention, ``cuda_graphs.py`` the fixed-shape decode step and its CUDA graphs, ``tokens.py`` the
on-device token sampling.
"""
from .sampler import Sampler, SamplerOutput
from .tokens import SamplingParams, sample_tokens

__all__ = ["Sampler", "SamplerOutput", "SamplingParams", "sample_tokens"]
