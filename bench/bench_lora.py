"""Sampling with LoRA adapters, the two ways side by side (``sampling.lora_merge``, generate/weights.py):
merged into the engine's weight buffers at each call (``W + s B A``; the decode runs plain GEMMs) or
the low-rank add in every forward (a linear's ``base(x) + s B(A x)``, an expert bank's ``bank + s
bmm(B, A)`` formed in every forward).

    python -m bench --only lora

One ``Sampler.generate`` call (eager decode, the CPU's; the merge's cost at the call's start
included), P prompts x G samples, stopping disabled so every row makes exactly ``new`` tokens;
throughput is generated tokens per second. The note gives the median CPU time of a call and of a
decode step (call / new): on a shared machine the CPU time (``--threads 1``) is the work itself,
the wall time also the wait for a core. Models are random (bench/bench_moe.py's): the dense Qwen3
with adapters on its 7 decoder linears ("linear adapters"), the Qwen3-MoE with adapters on its
attention linears and its expert banks (``experts: true``; "expert adapters"). Rows of one comparison:
``medix_fast`` (merged, ``lora_merge: auto``'s choice) and ``low-rank add`` (``lora_merge: false``).
  tiny: bench_moe's CPU shape (hidden 128, 4 layers, 8 experts of 128, 2 active), rank 8,
        8 prompts x G=4 x 32 new;
  larger: hidden 512, 4 layers, 32 experts of 256, 4 active (dense intermediate 1,024), vocab 8,192,
        rank 16, 8 prompts x G=4 x 32 new.
  GPU (not run yet): Qwen3-30B-A3B's layer (bench_moe's GPU shape: hidden 2048, 128 experts of 768,
        8 active; dense 6,144) at 4 layers, bf16, CUDA graphs, rank 16, 64 prompts x G=5 x 128 new.
``--smoke``: the embedded tiny MoE's shape, 2 x 2 x 8.
"""
from __future__ import annotations

import statistics
import time

import torch

from .bench_moe import prompts_and_completions, random_model
from .case import SUBJECT, Case

SHAPES = {  # TinyMoeConfig fields, vocab, (prompts, G, new tokens, prompt tokens), rank
    "smoke": (dict(), 256, (2, 2, 8, 12), 4),
    "tiny": (dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8,
                  experts_per_token=2, expert_intermediate=128, init_std=0.02), 2048, (8, 4, 32, 64), 8),
    "larger": (dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, num_experts=32,
                    experts_per_token=4, expert_intermediate=256, init_std=0.02), 8192, (8, 4, 32, 64), 16),
    "gpu": (dict(hidden_size=2048, num_layers=4, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                 experts_per_token=8, expert_intermediate=768, max_position_embeddings=4096, init_std=0.02),
            151_936, (64, 5, 128, 128), 16),
}
IMPLS = {SUBJECT: True, "low-rank add": False}  # sampling.lora_merge
KINDS = {"linear adapters": None, "expert adapters": "auto"}  # random_model's experts argument (None: dense)


def adapted_rollout(fields: dict, vocab: int, experts: str | None, rank: int, layout: tuple, merge: bool,
                    device: torch.device, case: Case | None = None):
    """The rollout callable of a random model with rank-``rank`` adapters (B non-zero); each call
    writes the median CPU time so far into ``case.note``."""
    from medix_fast.config import LoraConfig
    from medix_fast.generate import Sampler
    from medix_fast.model.lora import adapter_parameters, add_adapters

    model = random_model(fields, vocab, experts, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    # the default targets: the 7 decoder linears (the MoE's its 4 attention linears, its experts not nn.Linear)
    add_adapters(model, LoraConfig(rank=rank, alpha=2 * rank, experts=experts is not None))
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0, 0.02)
    prompts, _ = prompts_and_completions(layout, vocab)
    _, g, new, _ = layout
    sampler = Sampler(model.eval(), lora_merge=merge)
    cpu = []

    def call():
        start = time.process_time()
        sampler.generate(prompts, n=g, max_new_tokens=new, temperature=1.0, stop_token_ids=[], seed=0)
        cpu.append(time.process_time() - start)
        if case is not None and device.type == "cpu":
            ms = statistics.median(cpu) * 1e3
            case.note = f"CPU {ms:,.0f} ms a call, {ms / new:.1f} ms a step ({len(cpu)} calls)"
    return call


def cases(smoke: bool, device: torch.device) -> list[Case]:
    out = []
    for size in ["smoke"] if smoke else ["gpu"] if device.type == "cuda" else ["tiny", "larger"]:
        fields, vocab, layout, rank = SHAPES[size]
        prompts_n, g, new, _ = layout
        from medix_fast.demo.tiny_moe import TinyMoeConfig

        m = TinyMoeConfig(**fields)
        for kind, experts in KINDS.items():
            model = (f"{m.num_experts} experts x{m.expert_intermediate}, {m.experts_per_token} active"
                     if experts else f"dense x{m.expert_intermediate * m.experts_per_token}")
            shape = f"h{m.hidden_size}x{m.num_layers} {model}, r={rank}, {prompts_n} x G={g} x {new} new"
            for impl, merge in IMPLS.items():
                work = prompts_n * g * new
                case = Case("lora_sampling", kind, impl, shape, work, None, work=work, work_unit="tok/s")
                case.build = lambda dev, fields=fields, vocab=vocab, experts=experts, rank=rank, layout=layout, \
                    merge=merge, case=case: adapted_rollout(fields, vocab, experts, rank, layout, merge, dev, case)
                out.append(case)
    return out
