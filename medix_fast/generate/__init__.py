"""The in-process rollout engine: G completions per prompt from the live training weights.

    from medix_fast.generate import Sampler
    out = Sampler(model, max_num_seqs=64).generate(prompt_ids, n=8, max_new_tokens=512)
    python -m medix_fast.generate --plan --config configs/medix_r1_8b_dapo.yaml --device-memory-gb 141

``sampler.py`` is the public engine; ``scheduler.py`` (continuous batching, preemption),
``blocks.py`` (block accounting) and ``sequence.py`` (prompt and row records) the host side;
``runner.py`` (packing steps, the model forward), ``kv_cache.py`` (paged K/V pool, attention
back-end), ``attention.py`` (cascade attention, back-end choice; the paged decode kernel is
``medix_fast.kernels.triton_decode``), ``cuda_graphs.py`` and ``weights.py`` (the copy of the weights the
graphs read) the device side; ``tokens.py`` the token sampling;
``memory.py`` the memory plan; ``group_sampler.py`` samples by groups of ranks on a tensor-parallel
copy of the policy (``tensor_parallel.py``, ``sampling.tensor_parallel``). The public names are imported when first asked for (torch comes
with them), so that ``python -m medix_fast.generate --plan`` reads its arguments at once.
"""
PUBLIC = {"Sampler": "sampler", "GroupSampler": "group_sampler", "SamplerOutput": "sampler", "SamplingParams": "tokens", "sample_tokens": "tokens"}


def __getattr__(name: str):
    if name in PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(PUBLIC)
