"""Sampler throughput: medix_fast's KV-cached ``Sampler`` against Hugging Face ``generate``.

    python -m bench --only sampler

Both sample the same prompts from the same randomly initialised Qwen2 model (no download) at
temperature 1, top-p 1, no top-k, with stopping disabled so every row produces exactly
``max_new_tokens`` tokens and both do the same work; prompts are of different lengths
(left-padded for ``generate``), each sampled G times (``generate``: ``num_return_sequences``).
  CPU: a ~3M-parameter Qwen2 (hidden 192, 6 layers, vocab 4,096) in fp32,
       8 prompts x G=8 x 128 new tokens (batch 64).
  GPU: Qwen2.5-0.5B's shape (hidden 896, 24 layers, vocab 151,936) in bf16, at batch 1
       (1 prompt x 1) and batch 64 (8 prompts x G=8), 128 new tokens.
Throughput is generated tokens per second. GB/s counts only the weights read once per decode step
(parameter bytes x new tokens), a lower bound on the traffic, so % of HBM bandwidth is too.
"""
from __future__ import annotations

import torch

from .case import SUBJECT, Case

CPU_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096)
GPU_MODEL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151_936)  # Qwen2.5-0.5B
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=256)


def random_model(fields: dict, device: torch.device, dtype: torch.dtype, arch: str = "qwen2"):
    """A randomly initialised, never-stopping ``arch`` ("qwen2" or "qwen3") causal LM with ``fields``."""
    import transformers

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{name}Config")(**fields, max_position_embeddings=4096, tie_word_embeddings=True,
                                                    eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for a 1.7B model
        model = getattr(transformers, f"{name}ForCausalLM")(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # never stop early: equal work for both
    model.generation_config.pad_token_id = 0
    return model


def random_prompts(count: int, vocab: int, min_len: int, max_len: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_generate(model, prompts: list[list[int]], n: int, new_tokens: int):
    width = max(map(len, prompts))
    device = model.device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # (P, T) left-padded
    mask = (torch.arange(width, device=device)[None] >= width - torch.tensor(
        [len(p) for p in prompts], device=device)[:, None]).long()  # (P, T)

    def fn():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              num_return_sequences=n)
    return torch.no_grad()(fn)


def medix_generate(model, prompts: list[list[int]], n: int, new_tokens: int):
    from medix_fast.generate import Sampler  # the sampler's public API (bench/gpu_check.py calls it through here)

    sampler = Sampler(model, max_batch_size=len(prompts) * n, max_seq_len=max(map(len, prompts)) + new_tokens)
    return lambda: sampler.generate(prompts, n=n, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                    top_k=0, stop_token_ids=[], seed=0)


def cases(smoke: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    fields = SMOKE_MODEL if smoke else (GPU_MODEL if gpu else CPU_MODEL)
    dtype = torch.bfloat16 if gpu else torch.float32
    new_tokens = 8 if smoke else 128
    layouts = [(2, 2)] if smoke else ([(1, 1), (8, 8)] if gpu else [(8, 8)])  # (prompts, G)
    lengths = (4, 12) if smoke else (32, 128)
    name = "smoke" if smoke else ("Qwen2.5-0.5B shape" if gpu else "Qwen2 ~3M")
    impls = {SUBJECT: medix_generate, "hf generate": hf_generate}
    cases = []
    for prompts_n, g in layouts:
        for impl, make in impls.items():
            def build(dev, prompts_n=prompts_n, g=g, make=make):
                model = random_model(fields, dev, dtype)
                return make(model, random_prompts(prompts_n, fields["vocab_size"], *lengths), g, new_tokens)
            rows = prompts_n * g
            shape = f"{name} {'bf16' if gpu else 'fp32'}, {prompts_n} prompts x G={g} x {new_tokens} new"
            param_bytes = _param_count(fields) * (2 if gpu else 4)
            cases.append(Case("sampler", f"batch {rows}", impl, shape, rows * new_tokens, build,
                              bytes=param_bytes * new_tokens, work=rows * new_tokens, work_unit="tok/s"))
    return cases


def _param_count(f: dict) -> int:
    """Parameters of a tied-embedding Qwen2 decoder with ``f``'s fields (biases on q/k/v)."""
    h, kv = f["hidden_size"], f["hidden_size"] // f["num_attention_heads"] * f["num_key_value_heads"]
    attn = h * h * 2 + h * kv * 2 + h + 2 * kv
    layer = attn + 3 * h * f["intermediate_size"] + 2 * h
    return f["vocab_size"] * h + f["num_hidden_layers"] * layer + h
