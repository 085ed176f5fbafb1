"""Rollout throughput and K/V memory: medix_fast's engine against Hugging Face ``generate``.

    python -m bench --only sampler

Workloads, on a randomly initialised Qwen2 (no download), temperature 1, top-p 1, no top-k:
- long-tail: 64 prompts x G=8, a stop-token set of 41 ids (a near-uniform random model then
  stops with probability ~1 % per token: roughly geometric lengths of mean ~100), capped at 512
  new tokens, ``max_num_seqs`` 64. ``generate`` runs batches of 64 rows (8 prompts x 8), each
  until its longest row stops.
  The engine runs it twice: at ``max_num_seqs`` 64 (the issue's setting, ``medix_fast``) and at
  512 (``medix_fast max_num_seqs=512``: every row decoding at once, as the static-cache sampler
  this engine replaced did; that sampler was benchmarked beside it until the engine beat it, then
  removed: its figures stay in bench/results/sampler/cpu.md and docs/benchmarks.md).
- uniform: 8 prompts x G=8 x 128 new tokens, stopping disabled (every row makes 128).
Prompt lengths are drawn in [32, 128]; prompts are left-padded for ``generate``.
  CPU: a ~3M-parameter Qwen2 (hidden 192, 6 layers, vocab 4,096) in fp32.
  GPU: Qwen3-1.7B's sizes (hidden 2,048, 28 layers, 16 heads / 8 KV heads of 128, vocab 151,936)
       as a Qwen2 (q/k/v biases, no q/k norms), in bf16.
Throughput is generated tokens per second (each implementation's own count: with stop tokens
they sample different lengths). The long-tail calls are long (``generate`` takes minutes on a
CPU), so each implementation's is measured alone in a fresh process: one warm-up call, then one
timed call whose peak memory is taken too; the uniform ones are timed round-robin as usual. The note gives each implementation's K/V peak: the engine's
most blocks in use at once (``kv_peak``) next to the bytes of the live tokens they held then
(``kv_live``: prompts once, each row's own tokens), ``generate``'s DynamicCache (64 rows x the
batch's padded prompt + steps). GB/s (GPU) counts the weights read once per decode step.
"""
from __future__ import annotations

from functools import partial

import torch

from .case import SUBJECT, Case

CPU_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096)
GPU_MODEL = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=151_936)  # Qwen3-1.7B's sizes
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=256)
STOPS = list(range(1, 42))  # 41 ids: ~1 % per token under a near-uniform model
WORKLOADS = {  # name: (prompts, G, max new tokens, stop ids, max_num_seqs)
    "long-tail": (64, 8, 512, STOPS, 64),
    "uniform": (8, 8, 128, [], 64),
}


def random_model(fields: dict, device: torch.device, dtype: torch.dtype, arch: str = "qwen2"):
    """A randomly initialised, never-stopping ``arch`` ("qwen2" or "qwen3") causal LM with ``fields``
    (bench/gpu_check.py builds its models here too)."""
    import transformers

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{name}Config")(**fields, max_position_embeddings=4096, tie_word_embeddings=True,
                                                    eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for a 1.7B model
        model = getattr(transformers, f"{name}ForCausalLM")(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # stops only where a call asks
    model.generation_config.pad_token_id = 0
    return model


def random_prompts(count: int, vocab: int, min_len: int, max_len: int, low: int = 1) -> list[list[int]]:
    """``count`` prompts of ids in [low, vocab) with lengths in [min_len, max_len]."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(low, vocab, (n,), generator=gen).tolist() for n in lengths]


def _token_bytes(model) -> int:
    from medix_fast.generate.memory import kv_bytes_per_token

    return kv_bytes_per_token(model.config, model.dtype)


def hf_generate(model, prompts: list[list[int]], n: int, new: int, stops: list[int] = (), batch_rows: int = 64):
    """``generate`` in batches of ``batch_rows`` rows (batch_rows // n prompts each); the returned
    callable gives (tokens generated, note). Without ``stops`` every row makes ``new`` tokens."""
    device, per_batch, stops = model.device, max(1, batch_rows // n), list(stops)
    batches = []
    for i in range(0, len(prompts), per_batch):
        chunk = prompts[i:i + per_batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # (P, T) left-padded
        mask = (torch.arange(width, device=device)[None] >= width - torch.tensor(
            [len(p) for p in chunk], device=device)[:, None]).long()  # (P, T)
        batches.append((ids, mask))
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new, num_return_sequences=n,
                  eos_token_id=stops or None, pad_token_id=0)
    if not stops:
        kwargs["min_new_tokens"] = new

    @torch.no_grad()
    def fn():
        torch.manual_seed(0)
        tokens, peak = 0, 0
        for ids, mask in batches:
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]  # (rows, steps)
            done = torch.isin(out, torch.tensor(stops, device=device)) if stops else torch.zeros_like(out, dtype=bool)
            first = torch.where(done.any(1), done.int().argmax(1) + 1, out.shape[1])  # (rows,) lengths
            tokens += int(first.sum())
            peak = max(peak, out.shape[0] * (ids.shape[1] + out.shape[1]) * _token_bytes(model))
        return tokens, f"mean_len={tokens / (len(prompts) * n):.1f}, kv_peak_mb={peak / 2**20:.1f}"
    return fn


def medix_generate(model, prompts: list[list[int]], n: int, new: int, stops: list[int] = (), max_num_seqs: int = 64):
    """The engine (``medix_fast.generate.Sampler``, its public API); the returned callable gives
    (tokens generated, note with the K/V peak against the live tokens' bytes)."""
    from medix_fast.generate import Sampler

    sampler = Sampler(model, max_num_seqs=max_num_seqs)

    def fn():
        out = sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, top_p=1.0, top_k=0,
                               stop_token_ids=list(stops), seed=0)
        s, per_token = sampler.stats, _token_bytes(model)
        tokens = sum(map(len, out.completion_ids))
        peak, live = s.peak_blocks * s.block_bytes, s.live_tokens_at_peak * per_token
        return tokens, (f"max_num_seqs={max_num_seqs}, mean_len={tokens / len(out.completion_ids):.1f}, "
                        f"kv_peak_mb={peak / 2**20:.1f}, kv_live_mb={live / 2**20:.1f}, "
                        f"kv_peak/live={peak / live:.2f}, steps={s.steps}, preemptions={s.preemptions}")
    return fn


def _filled(case: Case, fn):
    """``fn`` that writes its (tokens, note) into ``case`` (the report's throughput and note)."""
    def call():
        case.work, case.note = fn()
    return call


def cases(smoke: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    fields = SMOKE_MODEL if smoke else (GPU_MODEL if gpu else CPU_MODEL)
    dtype = torch.bfloat16 if gpu else torch.float32
    name = "smoke" if smoke else ("Qwen3-1.7B shape" if gpu else "Qwen2 ~3M")
    out = []
    for workload, (prompts_n, g, new, stops, max_num_seqs) in WORKLOADS.items():
        if smoke:
            prompts_n, new = min(prompts_n, 4), min(new, 8)
        impls = {SUBJECT: partial(medix_generate, max_num_seqs=max_num_seqs), "hf generate": hf_generate}
        if workload == "long-tail":  # every row decoding at once, as the static sampler this engine replaced did
            impls[f"{SUBJECT} max_num_seqs={prompts_n * g}"] = partial(medix_generate, max_num_seqs=prompts_n * g)
        shape = f"{name} {'bf16' if gpu else 'fp32'}, {prompts_n} prompts x G={g}, <= {new} new"
        for impl, make in impls.items():
            case = Case("sampler", workload, impl, shape, prompts_n * g * new, None, work=prompts_n * g * new,
                        work_unit="tok/s", bytes=_param_count(fields) * dtype.itemsize * new)

            def build(dev, case=case, make=make, prompts_n=prompts_n, g=g, new=new, stops=stops):
                model = random_model(fields, dev, dtype)
                prompts = random_prompts(prompts_n, fields["vocab_size"], *((4, 12) if smoke else (32, 128)),
                                         low=len(STOPS) + 1)
                return _filled(case, make(model, prompts, g, new, stops))
            case.build = build
            if workload == "long-tail" and not smoke:
                case.build, case.measure = None, partial(_once, build)
            out.append(case)
    return out


def _once(build, device: torch.device, budget) -> tuple:
    """One warm-up call, then one timed call whose peak memory is measured too."""
    import time

    from .timing import PeakMemory, Timing

    fn = build(device)
    fn()
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return Timing(ms, ms, ms, 1), memory.stop()


def _param_count(f: dict) -> int:
    """Parameters of a tied-embedding Qwen2 decoder with ``f``'s fields (biases on q/k/v)."""
    h, kv = f["hidden_size"], f["hidden_size"] // f["num_attention_heads"] * f["num_key_value_heads"]
    attn = h * h * 2 + h * kv * 2 + h + 2 * kv
    layer = attn + 3 * h * f["intermediate_size"] + 2 * h
    return f["vocab_size"] * h + f["num_hidden_layers"] * layer + h
